"""Classifier fine-tuning: a chatforge model with a classification head, trained on labelled text.

    {"text": "What a lovely day.", "label": "positive"}

The text is read as <|bos|> text <|eos|> and classified at the <|eos|>: cross-entropy over the classes,
each example weighing the same. Held-out accuracy and, per class, precision, recall and F1 come from the
confusion matrix (`classification_report`). A trained classifier can also be the reward of RLHF: the
log-probability of a chosen class (`reward.reward_head`), e.g. "make the answers positive".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.chat_format import check_text
from chatforge.checkpoint import load_model
from chatforge.comparisons import text_ids
from chatforge.config import DEVICE_HELP, require_positive, save_json
from chatforge.data import load_splits
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.reward import last_token_outputs, right_pad
from chatforge.runtime import Dist, all_reduce_sum, pick_device
from chatforge.sources import parse_records
from chatforge.tokenizer import Tokenizer
from chatforge.train import (
    FineTuneConfig, FineTuneTask, fine_tuning_start, process_share, resolve_run_config, run_stage,
    set_max_steps_from_epochs,
)

REPORT_FILE = "classification_report.json"


@dataclass
class ClassifyConfig(FineTuneConfig):
    init: str = field(default="", metadata={"help": "checkpoint (or run folder) to start from: pretrained or SFT"})
    data: list[str] = field(default_factory=list, metadata={"help": "labelled text files (.jsonl/.parquet): {text, label}"})
    text_field: str = field(default="text", metadata={"help": "field holding the text"})
    label_field: str = field(default="label", metadata={"help": "field holding the class (a string or an integer)"})
    classes: list[str] = field(default_factory=list, metadata={
        "help": "class names in output order (default: the labels found in --data, sorted)"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training examples; sets max_steps when > 0"})


@dataclass
class Labelled:
    ids: np.ndarray
    label: str


def load_labelled(paths: list[str], config: ClassifyConfig | ClassifyEvalConfig, tokenizer: Tokenizer,
                  max_seq_len: int) -> tuple[list[Labelled], int]:
    def parse(record: dict) -> Labelled:
        text, label = record.get(config.text_field), record.get(config.label_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"expected a non-empty string in {config.text_field!r}")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ValueError(f"expected a class name or number in {config.label_field!r}")
        check_text(text, config.text_field)
        ids = text_ids(text, tokenizer)
        if len(ids) > max_seq_len:
            raise ValueError(f"{len(ids)} tokens, longer than the model's context ({max_seq_len})")
        return Labelled(np.array(ids, dtype=np.int64), str(label))

    items, skipped = parse_records(paths, parse, config.skip_invalid, "labelled text")
    return [x for _, x in items], skipped


@torch.no_grad()
def predict(model: GPT, sequences: list[np.ndarray], pad_id: int, batch_size: int) -> list[int]:
    """The most likely class of each sequence."""
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, lengths = right_pad(sequences[start : start + batch_size], pad_id)
        out += last_token_outputs(model, ids.to(model.embed_tokens.weight.device), lengths).argmax(-1).tolist()
    return out


def evaluate_classifier(model: GPT, tokenizer: Tokenizer, examples: list[Labelled], batch_size: int = 16) -> dict:
    """The classification report of a trained classifier on labelled examples."""
    labels = model.config.labels
    unknown = sorted({x.label for x in examples} - set(labels))
    if unknown:
        raise UserError(f"labels {', '.join(unknown)} are not among the classifier's classes {', '.join(labels)}")
    was_training = model.training
    model.eval()
    predicted = predict(model, [x.ids for x in examples], tokenizer.pad_id, batch_size)
    model.train(was_training)
    return classification_report(confusion_matrix([labels.index(x.label) for x in examples], predicted, len(labels)), labels)


# --- metrics -------------------------------------------------------------------------------------------

def confusion_matrix(true: list[int], predicted: list[int], classes: int) -> np.ndarray:
    """counts[t, p]: examples of class t predicted as p."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return counts


def classification_report(counts: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, and per class precision = TP / predicted, recall = TP / actual, F1 = their harmonic mean
    (0 where undefined), support; macro F1 = the classes' mean F1."""
    true_positive = np.diag(counts).astype(float)
    predicted, actual = counts.sum(axis=0), counts.sum(axis=1)
    per_class = {}
    for i, name in enumerate(labels):
        precision = true_positive[i] / predicted[i] if predicted[i] else 0.0
        recall = true_positive[i] / actual[i] if actual[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual[i])}
    return {"accuracy": float(true_positive.sum() / max(counts.sum(), 1)),
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "classes": per_class, "confusion": counts.tolist(), "labels": list(labels)}


def format_report(report: dict) -> str:
    width = max(len(name) for name in report["labels"]) + 2
    lines = [f"{'class':<{width}}precision  recall      f1  support"]
    for name, c in report["classes"].items():
        lines.append(f"{name:<{width}}{c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:6.3f}  {c['support']:7d}")
    lines.append(f"accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}")
    return "\n".join(lines)


# --- the task --------------------------------------------------------------------------------------------

class ClassifyTask(FineTuneTask):
    def __init__(self, config: ClassifyConfig, tokenizer: Tokenizer, train: list[Labelled], val: list[Labelled],
                 d: Dist, device: torch.device):
        super().__init__(config, tokenizer, train, val, d, device, [len(x.ids) for x in train], "examples")
        self.classes = config.classes
        self.seq_len = round(float(np.mean([len(x.ids) for x in train])))
        self.tokens_per_step = self.seq_len * config.batch_size

    def _collate(self, examples: list[Labelled]):
        ids, lengths = right_pad([x.ids for x in examples], self.tokenizer.pad_id)
        labels = torch.tensor([self.classes.index(x.label) for x in examples])
        return ids.to(self.device), lengths, labels.to(self.device)

    def micro_batches(self, step: int, accumulation: int):
        batch = self.step_items(step)
        for part in process_share(batch, self.d, accumulation):
            yield self._collate(part), len(part) * self.d.world_size / len(batch)

    def loss(self, model, batch) -> torch.Tensor:
        (ids, lengths, labels), share = batch
        return F.cross_entropy(last_token_outputs(model, ids, lengths).float(), labels) * share

    def held_out_metrics(self, model, examples: list[Labelled]) -> tuple[float, np.ndarray]:
        """Mean loss and confusion matrix of `examples` (this process's share), over all processes."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count
        counts = torch.zeros(len(self.classes), len(self.classes), dtype=torch.float64, device=self.device)
        for start in range(0, len(examples), self.config.micro_batch_size):
            ids, lengths, labels = self._collate(examples[start : start + self.config.micro_batch_size])
            logits = last_token_outputs(model, ids, lengths).float()
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 torch.tensor(len(labels), dtype=torch.float64, device=self.device)])
            counts += torch.from_numpy(confusion_matrix(labels.tolist(), logits.argmax(-1).tolist(),
                                                        len(self.classes))).to(counts)
        total, count = all_reduce_sum(sums, self.d).tolist()
        return total / max(count, 1), all_reduce_sum(counts, self.d).cpu().numpy().astype(np.int64)

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:  # nothing held out (a validation fraction of 0)
            return {}
        loss, counts = self.held_out_metrics(model, self.held_out())
        report = classification_report(counts, self.classes)
        return {"val_loss": loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}

    def finish(self, model: GPT) -> None:
        """The per-class report on the whole held-out set, printed and written to the run folder."""
        if not self.val:
            return
        model.eval()
        with torch.no_grad():
            _, counts = self.held_out_metrics(model, self.val[self.d.rank :: self.d.world_size])
        model.train()
        report = classification_report(counts, self.classes)
        if self.d.is_main:
            print(format_report(report))
            save_json(report, Path(self.config.out) / REPORT_FILE)


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[ClassifyConfig, Path | None]:
    return resolve_run_config(ClassifyConfig, "classify", preset, overrides, resume, needs={
        "init": "CHECKPOINT", "data": "FILE [FILE ...] ({text, label} records)"})


def train_classifier(config: ClassifyConfig, resume_from: Path | None = None) -> Path:
    """Fine-tune a model with a classification head on labelled text; returns the run folder."""

    def setup(device: torch.device, d: Dist):
        base, tokenizer, path = load_model(resume_from or config.init, device)
        max_len = base.config.max_seq_len
        train, val, skipped = load_splits(lambda paths: load_labelled(paths, config, tokenizer, max_len),
                                          config.data, config.val_data, config.val_fraction, config.seed)
        found = sorted({x.label for x in train + val})
        if resume_from is not None:
            config.classes = base.config.labels
        elif not config.classes:
            config.classes = found
        unknown = sorted(set(found) - set(config.classes))
        if unknown:
            raise UserError(f"labels {', '.join(unknown)} are not among --classes {', '.join(config.classes)}")
        if len(config.classes) < 2:
            raise UserError(f"a classifier needs at least 2 classes, the data has {len(config.classes)}")
        model = base if resume_from is not None else fine_tuning_start(base, tokenizer, path, config, "classifier",
                                                                       config.classes)
        if d.is_main:
            counts = {c: sum(x.label == c for x in train) for c in config.classes}
            print(f"classify: {len(train):,} training and {len(val):,} held-out examples; classes "
                  + ", ".join(f"{c} ({n:,})" for c, n in counts.items())
                  + (f"; {skipped:,} invalid record(s) skipped" if skipped else ""))
        task = ClassifyTask(config, tokenizer, train, val, d, device)
        set_max_steps_from_epochs(config, task.steps_per_epoch)
        return model, tokenizer, task

    return run_stage(config, "classify", setup, resume_from)


# --- the command: classify eval --------------------------------------------------------------------------

@dataclass
class ClassifyEvalConfig:
    checkpoint: str = field(default="", metadata={"help": "classifier checkpoint, or its run folder", "positional": True})
    data: list[str] = field(default_factory=list, metadata={
        "help": "labelled files (.jsonl/.parquet) of {text, label}", "required": True})
    text_field: str = field(default="text", metadata={"help": "field holding the text"})
    label_field: str = field(default="label", metadata={"help": "field holding the class"})
    out: str = field(default="", metadata={"help": "also write the report as JSON here"})
    batch_size: int = field(default=16, metadata={"help": "texts per forward pass"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    skip_invalid: bool = field(default=False, metadata={"help": "count and skip invalid records instead of stopping"})

    def __post_init__(self):
        require_positive(self, "batch_size")


def eval_classifier(config: ClassifyEvalConfig) -> dict:
    """`chatforge classify eval`: per-class precision, recall and F1, accuracy and the confusion matrix on
    labelled text, printed (and written to `out`); the report."""
    model, tokenizer, path = load_model(config.checkpoint, pick_device(config.device))
    if model.config.head != "classifier":
        raise UserError(f"{path}: not a classifier (its head is {model.config.head!r})")
    examples, skipped = load_labelled(config.data, config, tokenizer, model.config.max_seq_len)
    report = evaluate_classifier(model, tokenizer, examples, config.batch_size)
    print(format_report(report) + (f"\n({skipped:,} invalid record(s) skipped)" if skipped else ""))
    if config.out:
        save_json(report, config.out)
        print(f"-> {config.out}")
    return report

