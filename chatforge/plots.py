"""Pictures of a run: training curves from metrics.jsonl, written as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

CURVES_FILE = "curves.png"


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled toward 0."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def plot_training_curves(metrics: list[dict], out: str | Path, title: str = "") -> Path:
    """Loss (train, smoothed, and every `val_*` metric) and speed (tokens/s, learning rate) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m and "skipped" not in m]
    evals = [m for m in metrics if any(k.startswith("val_") for k in m)]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.2))
    if train:
        steps = [m["step"] for m in train]
        losses = [m["loss"] for m in train]
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1)
        ax_loss.plot(steps, _smooth(losses), color="tab:blue", label="train (smoothed)")
        ax_speed.plot(steps, [m["tokens_per_s"] for m in train], color="tab:green", alpha=0.8)
        lr_axis = ax_speed.twinx()
        lr_axis.plot(steps, [m["lr"] for m in train], color="tab:orange", linestyle="--")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    val_keys = sorted({k for m in evals for k in m if k.startswith("val_")})
    for key, color in zip(val_keys, ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]):
        points = [(m["step"], m[key]) for m in evals if key in m]
        ax_loss.plot(*zip(*points), marker="o", color=color, label=key.replace("_", " "))
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.set(xlabel="step", title="throughput and learning rate")
    ax_speed.set_ylabel("tokens/s", color="tab:green")
    ax_speed.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
