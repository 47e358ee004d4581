import json
import random

import numpy as np
import pytest

from chatforge.checkpoint import load_model
from chatforge.classify import classification_report, confusion_matrix
from chatforge.train import read_metrics
from conftest import assert_one_line_error, run_cli, write_jsonl

GOOD = "good great lovely fine happy nice".split()
BAD = "bad awful sad poor ugly grim".split()
FILLER = "the a day film meal code list value it was this is so very".split()


def sentiment(n: int, seed: int) -> list[dict]:
    """'positive' texts hold a word of GOOD among filler words, 'negative' ones a word of BAD."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label == "positive" else BAD))
        records.append({"text": " ".join(words), "label": label})
    return records


def test_report_matches_a_hand_computed_confusion_matrix():
    # true:      a a a a b b b c c c
    # predicted: a a b c b b a c c b
    counts = confusion_matrix([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 2, 1, 1, 0, 2, 2, 1], 3)
    assert counts.tolist() == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    report = classification_report(counts, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(6 / 10)
    a, b, c = (report["classes"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 4), 4)
    assert a["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3))
    assert (c["precision"], c["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert report["macro_f1"] == pytest.approx(np.mean([a["f1"], b["f1"], c["f1"]]))
    never_predicted = classification_report(np.array([[3, 0], [2, 0]]), ["x", "y"])
    assert never_predicted["classes"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


@pytest.fixture(scope="module")
def sentiment_classifier(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    train = write_jsonl(root / "train.jsonl", sentiment(160, seed=0))
    val = write_jsonl(root / "val.jsonl", sentiment(40, seed=1))
    result = run_cli("classify", "train", "--preset", "tiny", "--init", pretrained, "--data", train,
                     "--val-data", val, "--out", root / "run", "--epochs", 6, "--no-progress")
    return root / "run", val, result


def test_tiny_classifier_separates_two_classes(sentiment_classifier, tmp_path):
    run, val, result = sentiment_classifier
    evals = [m for m in read_metrics(run) if "val_accuracy" in m]
    assert evals[-1]["val_accuracy"] > 0.9, evals[-1]
    report = json.loads((run / "classification_report.json").read_text())
    assert report["labels"] == ["negative", "positive"] and report["accuracy"] > 0.9
    assert sum(map(sum, report["confusion"])) == 40
    assert "macro F1" in result.stdout  # the per-class table is printed
    model, _, path = load_model(run)
    assert model.config.head == "classifier" and model.config.labels == ["negative", "positive"]
    config = json.loads((path / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    # the same numbers from `classify eval`
    result = run_cli("classify", "eval", run, "--data", val, "--out", tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["confusion"] == report["confusion"]


def test_a_classifier_is_a_reward(sentiment_classifier, tmp_path):
    run, _, _ = sentiment_classifier
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"prompt": "How was it?", "completions": ["it was a lovely day", "it was an awful day"]}])
    run_cli("reward", "score", run, "--input", answers, "--out", tmp_path / "scored.jsonl", "--label", "positive")
    positive, negative = json.loads((tmp_path / "scored.jsonl").read_text())["rewards"]
    assert negative < np.log(0.5) < positive <= 0  # log-probabilities of 'positive'
    result = run_cli("reward", "score", run, "--input", answers, "--out", tmp_path / "x.jsonl", check=False)
    assert_one_line_error(result, "needs --label, one of its classes: negative, positive")
    result = run_cli("reward", "eval", run, "--data", answers, "--out", tmp_path / "eval", check=False)
    assert_one_line_error(result, "evaluate a classifier with `classify eval`")


def test_classify_errors(pretrained, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "positive"}, {"text": "", "label": "x"}])
    result = run_cli("classify", "train", "--preset", "tiny", "--init", pretrained, "--data", bad,
                     "--out", tmp_path / "run", check=False)
    assert_one_line_error(result, "bad.jsonl:2: expected a non-empty string in 'text'")
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": "fine", "label": "positive"}] * 20)
    result = run_cli("classify", "train", "--preset", "tiny", "--init", pretrained, "--data", one_class,
                     "--out", tmp_path / "run2", check=False)
    assert_one_line_error(result, "at least 2 classes")
