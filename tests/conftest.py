"""Shared fixtures: the zero-install sample corpus, a small tokenizer trained on it, and its token shards."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.data import prepare
from chatforge.sources import nonempty_documents, write_sample_corpus
from chatforge.tokenizer import train_bpe

TEST_VOCAB = 512


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path, _ = write_sample_corpus(tmp_path_factory.mktemp("corpus") / "topics.jsonl", docstrings=False)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe(nonempty_documents([corpus]), TEST_VOCAB).save(out)
    return out


@pytest.fixture(scope="session")
def data_dir(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare([corpus], tokenizer_dir, out, val_fraction=0.1, workers=2, progress=False)
    return out


# Four questions a tiny model can learn to answer word for word, in the three conversation formats.
CHROMIUM = "/usr/bin/chromium"  # Debian's, driven by Playwright (no browser download)
# No internet here: without these Chromium tries to reach Google's services.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server"]

# Chromium logs the policy's refusals as console errors; the event also catches them before a listener is on.
_CSP_WATCH = """document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`Content Security Policy violation: ${e.violatedDirective} refused ${e.blockedURI || "inline code"}`));"""


def watch_csp(page) -> list[str]:
    """Every Content-Security-Policy violation on `page` (and on its reloads), from its first load on."""
    violations = []
    page.add_init_script(_CSP_WATCH)
    page.on("console", lambda m: "Content Security Policy" in m.text and violations.append(m.text))
    return violations


def assert_strict_page_headers(headers: dict) -> None:
    """A page's own inline script and style run (by hash), nothing else; no framing, sniffing or referrer."""
    directives = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    for name in ("script-src", "style-src"):
        sources = directives[name].split()
        assert sources and all(s.startswith("'sha256-") for s in sources), (name, directives[name])
    assert directives["default-src"] == directives["frame-ancestors"] == "'none'", directives
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


QA = [
    ("What is a tuple?", "An immutable sequence."),
    ("Name a loop.", "The for loop."),
    ("Say hello.", "Hello there!"),
    ("What does len do?", "It counts items."),
]


WORDS = "the a list of items value name file line code data text word number string loop set".split()


def keyword_rankings(n: int, k: int, seed: int) -> list[dict]:
    """K answers per prompt; an answer with more 'please' ranks higher (0 to K-1 of them)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        answers = []
        for count in range(k):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            for _ in range(count):
                words.insert(rng.randrange(len(words) + 1), "please")
            answers.append(" ".join(words))
        order = list(range(k))
        rng.shuffle(order)
        shuffled = [answers[i] for i in order]
        ranking = sorted(range(k), key=lambda i: -order[i])  # most 'please' first
        records.append({"prompt": rng.choice(["Say something.", "Answer me.", "Talk."]),
                        "completions": shuffled, "ranking": ranking})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def pretrained(data_dir, tmp_path_factory) -> Path:
    """A tiny pretraining run (20 steps)."""
    from chatforge import config as cfg
    from chatforge.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrained") / "run"
    config = cfg.from_dict(PretrainConfig, cfg.merge(cfg.load_preset("tiny", "pretrain"), {
        "data": str(data_dir), "out": str(out), "max_steps": 20, "progress": False}))
    return pretrain(config)


@pytest.fixture(scope="session")
def qa_conversations(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("qa") / "chat.jsonl", [
        {"messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}]},
        {"prompt": QA[1][0], "completion": QA[1][1]},
        {"conversations": [{"from": "human", "value": QA[2][0]}, {"from": "gpt", "value": QA[2][1]}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QA[3][0]},
                      {"role": "assistant", "content": QA[3][1]}]},
    ])


def sft_config(pretrained: Path, conversations: Path, out: Path, **overrides):
    from chatforge import config as cfg
    from chatforge.sft import SFTConfig

    base = cfg.merge(cfg.load_preset("tiny", "sft"), {
        "init": str(pretrained), "data": [str(conversations)], "val_data": [str(conversations)], "out": str(out),
        "batch_size": 4, "micro_batch_size": 2, "progress": False, "sample_prompts": [QA[0][0]]})
    return cfg.from_dict(SFTConfig, cfg.merge(base, overrides))


@pytest.fixture(scope="session")
def chat_model(pretrained, qa_conversations, tmp_path_factory) -> Path:
    """The tiny model fine-tuned until it answers the four questions word for word."""
    from chatforge.sft import sft

    out = tmp_path_factory.mktemp("sft") / "run"
    return sft(sft_config(pretrained, qa_conversations, out, max_steps=150, lr=3e-3, warmup_steps=10,
                          eval_every=75, checkpoint_every=150))


def run_cli(*args, check: bool = True, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`chatforge ARGS` in a real subprocess."""
    result = subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"chatforge {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def kill_when(*args, ready, timeout: float = 240, processes: int = 1) -> None:
    """Start `chatforge ARGS` (under torchrun when `processes` > 1), wait (polling) until `ready()` holds,
    then SIGKILL it and every process it started, as a crash of the machine would."""
    import signal
    import time

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    process = subprocess.Popen([*(launcher if processes > 1 else [sys.executable]), "-m", "chatforge", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else None)
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: kill the whole tree, leaves first
    for pid in [*reversed(descendants(process.pid)), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


# what a run logs that depends on the machine's speed, not on what it computes
TIMING = ("generate_s", "score_s", "train_s", "samples_per_s", "step_time", "tokens_per_s", "mfu")


def metrics_without_timing(run: Path) -> list[dict]:
    """A run's metrics.jsonl records without their timings: what an exact resume must reproduce."""
    from chatforge.train import read_metrics

    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run)]


def run_torchrun(*args, processes: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node PROCESSES -m chatforge ARGS` (gloo on CPU), one thread per process."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "chatforge", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"torchrun exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@contextlib.contextmanager
def reference_kernels():
    """chatforge's products on `F.linear`'s kernels (MKL on a CPU) instead of oneDNN (`chatforge.linear`), the
    kernels a reference library uses: a parity test compares the conversion, not two GEMM libraries' fp32
    rounding, each about 1e-4 from the exact logits of a 30-layer model."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TF32 acceleration", UserWarning)  # mkldnn.flags() sets TF32 too
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad-input failure: non-zero exit, one line on stderr that names the problem, no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatforge: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


class ServerProcess:
    """`chatforge ARGS --port P` on a free loopback port, up once GET /health answers 200 (a real server in a
    subprocess, for the labeling app and the API server)."""

    def __init__(self, log: Path, *args):
        import socket
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        with log.open("a") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "chatforge", *map(str, args), "--port", str(port)],
                                            stdout=out, stderr=subprocess.STDOUT)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 90
        while True:
            try:
                with opener.open(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"chatforge {' '.join(map(str, args))} did not come up:\n{log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
