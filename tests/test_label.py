"""chatforge label: the ranking app, run for real: the server as a subprocess, a real headless Chromium
driven by Playwright, concurrent clients, SIGKILL and restart, and the database read directly."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (CHROMIUM, CHROMIUM_FLAGS, ServerProcess, assert_one_line_error, assert_strict_page_headers,
                      run_cli, watch_csp, write_jsonl)

from chatforge.errors import UserError
from chatforge.label import LabelServeConfig, add_annotator, serve
from chatforge.label.database import check_submission, load_candidates
from chatforge.label.stats import agreement, kendall_tau, pairwise_agreement
from chatforge.comparisons import comparison_from_record

CANDIDATES = [
    {"prompt": "What is a tuple?", "completions": ["An immutable sequence.", "A list.", "A fish."],
     "completion_ids": [[40, 41, 6], [42, 6], [43, 44]], "finish_reasons": ["stop", "stop", "length"],
     "tokenizer": "0123456789abcdef", "sampling": {"temperature": 0.7, "seed": 1}},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
     "completions": ["Hello there!", "Go away.", "Hello."]},
    {"prompt": "Name a loop.", "completions": ["The for loop.", "A hula hoop.", "while"]},
]


def ratings(*values: tuple[int, int, int]) -> list[dict]:
    return [{"helpful": a, "honest": b, "harmless": c} for a, b, c in values]


GOOD_RATINGS = ratings((7, 7, 7), (2, 3, 6), (1, 1, 1))


# --- helpers: a real server in a subprocess, HTTP without a proxy ----------------------------------

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, path: str, token: str | None = None, body=None) -> tuple[int, dict]:
    """(status, JSON body) of GET path, or POST when there is a body."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with _http.open(urllib.request.Request(url + path, data=data, headers=headers), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server(ServerProcess):
    """`chatforge label serve` on its database, up once /health answers."""

    def __init__(self, db: Path, log: Path, *args: str):
        super().__init__(log, "label", "serve", "--db", db, *args)


def rankings_in(db: Path) -> list[dict]:
    """Every stored ranking, read straight from the SQLite file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT a.name, r.prompt_id, r.ranking, r.unacceptable, r.ratings FROM rankings r "
                            "JOIN annotators a ON a.id = r.annotator_id ORDER BY r.id").fetchall()
    return [{"annotator": name, "prompt_id": prompt_id, "ranking": json.loads(ranking),
             "unacceptable": json.loads(unacceptable), "ratings": json.loads(rates)}
            for name, prompt_id, ranking, unacceptable, rates in rows]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server (2 rankings per prompt) for the tests that do not kill it, and its annotators' tokens."""
    root = tmp_path_factory.mktemp("label")
    db = root / "labels.sqlite"
    tokens = {name: add_annotator(db, name) for name in ("alice", "bob", "carol")}
    server = Server(db, root / "server.log", "--input", str(write_jsonl(root / "candidates.jsonl", CANDIDATES)),
                    "--per-prompt", "2")
    yield server, db, tokens
    server.stop()


# --- agreement: pure functions against hand-computed values ---------------------------------------

def test_agreement_of_two_rankings():
    assert pairwise_agreement([0, 1, 2], [0, 1, 2]) == 1 and kendall_tau([0, 1, 2], [0, 1, 2]) == 1
    assert pairwise_agreement([0, 1, 2], [2, 1, 0]) == 0 and kendall_tau([0, 1, 2], [2, 1, 0]) == -1
    # one swap of three: pairs (0,1) discordant, (0,2) and (1,2) concordant
    assert pairwise_agreement([0, 1, 2], [1, 0, 2]) == pytest.approx(2 / 3)
    assert kendall_tau([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)
    # [0,1,2,3] vs [3,1,0,2]: of 6 pairs only (0,2) and (1,2) keep their order -> 2 concordant, 4 discordant
    assert pairwise_agreement([0, 1, 2, 3], [3, 1, 0, 2]) == pytest.approx(2 / 6)
    assert kendall_tau([0, 1, 2, 3], [3, 1, 0, 2]) == pytest.approx((2 - 4) / 6)
    for a, b in [([0, 1], [0, 2]), ([0, 0], [0, 0]), ([0], [0])]:
        with pytest.raises(ValueError):
            kendall_tau(a, b)


def test_agreement_over_prompts_and_annotators():
    summary = agreement({
        1: {"a": [0, 1, 2], "b": [0, 1, 2], "c": [2, 1, 0]},  # a-b 1 (tau 1), a-c 0 (-1), b-c 0 (-1)
        2: {"a": [0, 1]},                                     # one annotator: not compared
        3: {"a": [0, 1, 2], "b": [1, 0, 2]},                  # a-b 2/3 (tau 1/3)
    })
    assert (summary["prompts"], summary["comparisons"]) == (2, 4)
    assert summary["pairwise_agreement"] == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert summary["kendall_tau"] == pytest.approx((1 - 1 - 1 + 1 / 3) / 4)
    per = summary["per_annotator"]
    assert per["a"]["comparisons"] == 3 and per["a"]["pairwise_agreement"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert per["c"] == {"comparisons": 2, "pairwise_agreement": 0}
    assert agreement({1: {"a": [0, 1]}})["pairwise_agreement"] is None


# --- input and submission checks -------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"completions": ["a", "b"]}, "expected a 'prompt' field"),
    ({"prompt": 3, "completions": ["a", "b"]}, "'prompt' must be a string or a list of {role, content} messages"),
    ({"prompt": " ", "completions": ["a", "b"]}, "'prompt': message 0 (user): empty content"),
    ({"prompt": "q"}, "expected 'completions': a list of strings"),
    ({"prompt": "q", "completions": "ab"}, "expected 'completions': a list of strings"),
    ({"prompt": "q", "completions": ["a", 2]}, "expected 'completions': a list of strings"),
    ({"prompt": "q", "completions": []}, "'completions' has 0; ranking needs 2"),
    ({"prompt": "q", "completions": ["only one"]}, "'completions' has 1; ranking needs 2"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completions": ["a", "b"]},
     "must end with a user message"),
    ({"prompt": [{"role": "user"}], "completions": ["a", "b"]}, "'prompt': message 0 (user): content must be a string"),
    ({"prompt": [{"role": "robot", "content": "q"}], "completions": ["a", "b"]}, "unknown role 'robot'"),
    ({"prompt": "q", "completions": ["a", "b<|end|>"]}, "completion 1: contains the special token <|end|>"),
    ({"prompt": "q", "completions": ["a", "b"], "sampling": 0.7}, "'sampling' must be an object"),
])
def test_malformed_candidates_name_file_line_and_problem(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "candidates.jsonl", [CANDIDATES[0], record])
    with pytest.raises(UserError) as e:
        load_candidates(path)
    assert str(e.value).startswith(f"{path}:2: ") and expected in str(e.value), str(e.value)


def test_malformed_input_is_a_one_line_error_and_writes_nothing(tmp_path):
    path = tmp_path / "candidates.jsonl"
    path.write_text(json.dumps(CANDIDATES[0]) + "\n" + '{"prompt": "q", "completions": ["a", "b"\n')
    db = tmp_path / "labels.sqlite"
    result = run_cli("label", "serve", "--db", db, "--input", path, "--port", "0", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, f"{path}:2:", "not valid JSON")
    assert not db.exists()
    with pytest.raises(UserError, match="no such database; pass --input"):
        serve(LabelServeConfig(db=str(db)))


@pytest.mark.parametrize("body, expected", [
    ({"ranking": [0, 1]}, "must order all 3 answers"),
    ({"ranking": [0, 1, 1]}, "names an answer twice"),
    ({"ranking": [0, 1, 3]}, "list of answer indices 0..2"),
    ({"ranking": [0, 1, True]}, "list of answer indices 0..2"),
    ({"ranking": [0, 1, 2], "unacceptable": [5]}, "'unacceptable' must be a list of answer indices"),
    ({"ranking": [0, 1, 2], "ratings": GOOD_RATINGS[:2]}, "'ratings' must be a list of 3 objects"),
    ({"ranking": [0, 1, 2], "ratings": ratings((7, 7, 7), (2, 3, 8), (1, 1, 1))}, "from 1 to 7"),
    ({"ranking": [0, 1, 2], "ratings": [*GOOD_RATINGS[:2], {"helpful": 1, "honest": 1}]}, "'ratings' must be"),
])
def test_bad_submissions_say_what_is_wrong(body, expected):
    with pytest.raises(ValueError, match=expected):
        check_submission({"ratings": GOOD_RATINGS, **body}, 3)


def test_label_commands_explain_every_option(capsys):
    from chatforge.cli import build_parser

    for command, options in [("serve", ["--db", "--input", "--per-prompt", "--host", "--port"]),
                             ("add-annotator", ["--db", "NAME"]), ("export", ["--db", "--out"]),
                             ("stats", ["--db", "--per-prompt"])]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["label", command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


# --- the running server ----------------------------------------------------------------------------

def test_api_needs_a_known_token(shared):
    server, _, tokens = shared
    for token in (None, "not-a-token", ""):
        for path, body in [("/api/next", None), ("/api/me", None), ("/api/stats", None),
                           ("/api/rankings", {"prompt_id": 1, "ranking": [0, 1, 2]})]:
            status, answer = call(server.url, path, token, body)
            assert status == 401 and "error" in answer, (token, path, status, answer)
    assert call(server.url, "/api/me", tokens["alice"]) == (200, {"name": "alice", "per_prompt": 2})


def test_server_errors_are_logged_not_sent(shared):
    server, db, tokens = shared
    with sqlite3.connect(db) as conn:  # a broken database under the running server
        conn.execute("ALTER TABLE annotators RENAME TO annotators_away")
    try:
        status, answer = call(server.url, "/api/me", tokens["alice"])
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE annotators_away RENAME TO annotators")
    assert (status, answer) == (500, {"error": {"message": "internal server error", "type": "server_error",
                                                "param": None, "code": None}})
    deadline = time.monotonic() + 10  # the server logs it after sending the response
    while "no such table: annotators" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" in server.log.read_text() and "no such table: annotators" in server.log.read_text()
    assert call(server.url, "/api/me", tokens["alice"])[0] == 200


def test_browser_ranks_submits_and_the_database_holds_exactly_that(shared):
    server, db, tokens = shared
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) for the browser test")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # phone width
            errors = []  # script errors, blocked content (CSP), failed requests
            page.on("pageerror", lambda e: errors.append(str(e)))
            violations = watch_csp(page)
            assert_strict_page_headers(page.goto(server.url + "/").headers)
            page.fill("#token-input", "wrong")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_contain_text("not valid")
            expect(page.locator("#login-error")).to_contain_text("unknown token")  # the error's message, read
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))  # from here on, no 401s
            page.fill("#token-input", tokens["carol"])
            page.click("#login-button")
            expect(page.locator("#annotator-name")).to_have_text("carol")
            task = page.locator("#task")
            expect(task).to_be_visible()
            expect(page.locator("#progress")).to_contain_text("0 done / ")
            prompt_id = int(task.get_attribute("data-prompt-id"))
            order = page.locator("article.answer").evaluate_all("cards => cards.map(c => Number(c.dataset.completion))")
            assert sorted(order) == [0, 1, 2]

            page.reload()  # the token is remembered and the answers keep their order
            expect(task).to_have_attribute("data-prompt-id", str(prompt_id))
            assert page.locator("article.answer").evaluate_all(
                "cards => cards.map(c => Number(c.dataset.completion))") == order

            pick = lambda i: page.click(f'#answers [data-action="pick"][data-completion="{i}"]')  # noqa: E731
            pick(1)
            page.click("#reset")
            expect(page.locator("#answer-1")).to_have_attribute("data-rank", "")
            pick(0)
            pick(2)  # the last answer is placed for us: [0, 2, 1]
            expect(page.locator("#answer-1")).to_have_attribute("data-rank", "3")
            page.click('#ranking [data-action="up"][data-completion="2"]')  # -> [2, 0, 1]
            for i, rank in [(2, "1"), (0, "2"), (1, "3")]:
                expect(page.locator(f"#answer-{i} .badge")).to_have_text(rank)
            expect(page.locator("#submit")).to_be_disabled()  # ratings missing
            page.check('[data-action="unacceptable"][data-completion="1"]')
            for i, values in enumerate(GOOD_RATINGS):
                for aspect, value in values.items():
                    page.check(f'input[name="rate-{i}-{aspect}"][value="{value}"]')
            expect(page.locator("#submit")).to_be_enabled()
            page.click("#submit")
            expect(page.locator("#progress")).to_contain_text("1 done / ")
            expect(task).not_to_have_attribute("data-prompt-id", str(prompt_id))  # the next prompt loaded

            assert_strict_page_headers(page.goto(server.url + "/stats").headers)  # signed in: the same token
            expect(page.locator('#annotators tr[data-annotator="carol"]')).to_have_count(1)
            expect(page.locator("#stats")).to_be_visible()
            assert errors == []
            assert violations == []
            page.evaluate("localStorage.setItem('chatforge-label-token', 'wrong')")
            page.reload()
            expect(page.locator("#error")).to_have_text("unknown token")  # the error's message, read
        finally:
            browser.close()
    assert [r for r in rankings_in(db) if r["annotator"] == "carol"] == [
        {"annotator": "carol", "prompt_id": prompt_id, "ranking": [2, 0, 1], "unacceptable": [1],
         "ratings": GOOD_RATINGS}]


def test_concurrent_submissions_are_both_stored(shared):
    server, db, tokens = shared
    prompt_id = len(CANDIDATES)  # the one the browser test never gets first
    bodies = {"alice": {"prompt_id": prompt_id, "ranking": [0, 1, 2], "unacceptable": [], "ratings": GOOD_RATINGS},
              "bob": {"prompt_id": prompt_id, "ranking": [1, 0, 2], "unacceptable": [2], "ratings": GOOD_RATINGS}}
    start, results = threading.Barrier(2), {}

    def submit(name):
        start.wait()
        results[name] = call(server.url, "/api/rankings", tokens[name], bodies[name])

    threads = [threading.Thread(target=submit, args=(name,)) for name in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 and not answer["duplicate"] for status, answer in results.values()), results
    stored = {r["annotator"]: r for r in rankings_in(db) if r["prompt_id"] == prompt_id}
    assert {name: (r["ranking"], r["unacceptable"]) for name, r in stored.items()} == {
        name: (b["ranking"], b["unacceptable"]) for name, b in bodies.items()}

    # the same ranking again is acknowledged, not duplicated; a different one is refused
    status, answer = call(server.url, "/api/rankings", tokens["alice"], bodies["alice"])
    assert status == 200 and answer["duplicate"] and answer["id"] == results["alice"][1]["id"]
    status, answer = call(server.url, "/api/rankings", tokens["alice"], {**bodies["alice"], "ranking": [2, 1, 0]})
    assert status == 409 and "already ranked" in answer["error"]["message"]
    status, answer = call(server.url, "/api/rankings", tokens["alice"], {**bodies["alice"], "prompt_id": 99})
    assert status == 400 and "unknown prompt_id 99" in answer["error"]["message"]
    assert len([r for r in rankings_in(db) if r["prompt_id"] == prompt_id]) == 2
    # the prompt is complete (2 rankings): nobody else is given it
    status, task = call(server.url, "/api/next", tokens["carol"])
    assert status == 200 and task.get("prompt_id") != prompt_id

    # alice and bob disagree on one pair of three: agreement 2/3, tau 1/3, in the API and the command
    status, stats = call(server.url, "/api/stats", tokens["bob"])
    assert stats["agreement"]["comparisons"] == 1
    assert stats["agreement"]["pairwise_agreement"] == pytest.approx(2 / 3)
    assert stats["agreement"]["kendall_tau"] == pytest.approx(1 / 3)
    text = run_cli("label", "stats", "--db", db).stdout
    assert "pairwise 0.667, Kendall's tau 0.333" in text and "(>= 2 rankings)" in text


def test_acknowledged_ranking_survives_sigkill_and_exports(tmp_path):
    db, candidates = tmp_path / "labels.sqlite", write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    token = run_cli("label", "add-annotator", "--db", db, "dana").stdout.split()[-1]
    with pytest.raises(UserError, match="'dana' already exists"):
        add_annotator(db, "dana")
    server = Server(db, tmp_path / "server.log", "--input", str(candidates))
    status, task = call(server.url, "/api/next", token)
    assert status == 200 and task["progress"] == {"submitted": 0, "available": 3}
    body = {"prompt_id": task["prompt_id"], "ranking": [1, 2, 0], "unacceptable": [0], "ratings": GOOD_RATINGS}
    assert call(server.url, "/api/rankings", token, body)[0] == 200
    server.stop()  # SIGKILL, right after the acknowledgement

    server = Server(db, tmp_path / "server.log", "--input", str(candidates))  # the same file again: no new prompts
    try:
        assert "0 new prompts" in server.log.read_text()
        status, answer = call(server.url, "/api/rankings", token, body)
        assert status == 200 and answer["duplicate"]
        status, task = call(server.url, "/api/next", token)
        assert task["prompt_id"] != body["prompt_id"] and task["progress"] == {"submitted": 1, "available": 2}
    finally:
        server.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == len(CANDIDATES)

    out = tmp_path / "export" / "rankings.jsonl"
    assert "1 rankings ->" in run_cli("label", "export", "--db", db, "--out", out).stdout
    [line] = out.read_text().splitlines()
    record = json.loads(line)
    source = CANDIDATES[body["prompt_id"] - 1]
    assert {k: record[k] for k in ("prompt", "completions", "ranking", "unacceptable", "ratings", "annotator")} == {
        "prompt": source["prompt"], "completions": source["completions"], "ranking": [1, 2, 0], "unacceptable": [0],
        "ratings": GOOD_RATINGS, "annotator": "dana"}
    assert record["submitted_at"].endswith("Z")
    assert not list(out.parent.glob("*.tmp"))
    assert body["prompt_id"] == 1 and all(record[k] == source[k] for k in ("completion_ids", "finish_reasons", "tokenizer"))
    comparison = comparison_from_record(record)  # what `chatforge reward train` reads: the tokens as sampled
    assert comparison.ranking == [1, 2, 0] and comparison.answers == source["completions"]
    assert comparison.answer_ids == source["completion_ids"] and comparison.finished == [True, True, False]


def test_a_database_made_before_sampled_tokens_were_kept_gets_their_column(tmp_path):
    from chatforge.label.database import SCHEMA, init_database

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA.replace(",\n    tokens      TEXT", ""))
        assert "tokens" not in {row[1] for row in conn.execute("PRAGMA table_info(prompts)")}
    init_database(db)
    with sqlite3.connect(db) as conn:
        assert "tokens" in {row[1] for row in conn.execute("PRAGMA table_info(prompts)")}
