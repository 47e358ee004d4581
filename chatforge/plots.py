"""Pictures of a run: training curves from metrics.jsonl, written as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import UserError
from chatforge.files import atomic_open

CURVES_FILE = "curves.png"
PPO_CURVES_FILE = "ppo.png"


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled toward 0."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def plot_training_curves(metrics: list[dict], out: str | Path, title: str = "") -> Path:
    """Loss (train, smoothed, and every `val_*` metric) and speed (tokens/s, learning rate) against step."""
    plt = _pyplot()
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
    if ax_loss.get_legend_handles_labels()[0]:  # a run with nothing held out and no step logged yet has none
        ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.set(xlabel="step", title="throughput and learning rate")
    ax_speed.set_ylabel("tokens/s", color="tab:green")
    ax_speed.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_ppo_curves(metrics: list[dict], out: str | Path, title: str = "", kl_bound: float | None = None) -> Path:
    """What a PPO run is watched by, against iteration: reward (train and held-out), KL to the reference
    (with the alarm bound and β), entropy, clip fraction and approx KL, value loss and explained variance,
    and answer length with the reward-length correlation."""
    plt = _pyplot()
    train = [m for m in metrics if "reward" in m and "skipped" not in m]
    evals = [m for m in metrics if "val_reward" in m]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))

    def curve(ax, key, label, color, points=train, smooth=True, **style):
        pairs = [(m["step"], m[key]) for m in points if m.get(key) is not None]
        if not pairs:
            return
        steps, values = zip(*pairs)
        if smooth:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            values = _smooth(list(values))
        ax.plot(steps, values, color=color, label=label, **style)

    panels = [
        ("reward model score", [("reward", "train", "tab:blue", train, True), ("val_reward", "held-out", "tab:red", evals, False)]),
        ("KL to the reference (nats per answer)", [("kl_per_answer", "train", "tab:blue", train, True),
                                                    ("val_kl_per_answer", "held-out", "tab:red", evals, False)]),
        ("entropy (nats per token)", [("entropy", "policy", "tab:purple", train, True)]),
        ("update size", [("clip_fraction", "clip fraction", "tab:orange", train, True),
                         ("approx_kl", "approx KL to the sampling policy", "tab:green", train, True)]),
        ("value model", [("value_loss", "value loss", "tab:brown", train, True),
                         ("explained_variance", "explained variance", "tab:cyan", train, True)]),
        ("answers", [("answer_length", "length (tokens)", "tab:blue", train, True),
                     ("val_answer_length", "held-out length", "tab:red", evals, False)]),
    ]
    for ax, (name, series) in zip(axes.flat, panels):
        for key, label, color, points, smooth in series:
            curve(ax, key, label, color, points, smooth, marker=None if smooth else "o")
        ax.set(xlabel="iteration", title=name)
        ax.grid(alpha=0.3)
    kl_axis, length_axis = axes.flat[1], axes.flat[5]
    if kl_bound is not None:
        kl_axis.axhline(kl_bound, color="gray", linestyle="--", label=f"alarm bound ({kl_bound:g})")
    if len({m.get("beta") for m in train}) > 1:  # adaptive β
        beta_axis = kl_axis.twinx()
        curve(beta_axis, "beta", "β", "tab:olive", smooth=False, linestyle=":")
        beta_axis.set_ylabel("β", color="tab:olive")
    corr_axis = length_axis.twinx()
    curve(corr_axis, "reward_length_corr", "corr(reward, length)", "tab:gray", smooth=True, linestyle=":")
    corr_axis.set(ylim=(-1, 1), ylabel="corr(reward, length)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    """Write the figure atomically (a reader never sees half a PNG) and free it."""
    fig.tight_layout()
    out = Path(out)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _pyplot().close(fig)
    return out


def plot_calibration(bins: list[dict], out: str | Path, title: str = "") -> Path:
    """Reliability diagram: observed win rate against predicted P(win), one point per bin (sized by its
    count), next to the diagonal of a perfectly calibrated model. bins: {predicted, observed, count}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    if filled:
        biggest = max(b["count"] for b in filled)
        ax.plot([b["predicted"] for b in filled], [b["observed"] for b in filled], color="tab:blue")
        ax.scatter([b["predicted"] for b in filled], [b["observed"] for b in filled],
                   s=[20 + 200 * b["count"] / biggest for b in filled], color="tab:blue", label="reward model", zorder=3)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(first answer wins) = σ(r₁ − r₂)",
           ylabel="observed win rate", title=title or "reward model calibration")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out)


@dataclass
class PlotConfig:
    run_dir: str = field(default="", metadata={"help": "run folder", "positional": True})
    out: str = field(default="", metadata={"help": "PNG to write (empty: RUN_DIR/curves.png)", "metavar": "FILE"})


def plot_run(config: PlotConfig) -> list[Path]:
    """`chatforge plot`: a run's training curves, and its PPO curves when it is a PPO run."""
    from chatforge.train import METRICS_FILE, read_metrics  # here, not above: train.py imports this module

    run_dir = Path(config.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE}: not a run folder")
    metrics = read_metrics(run_dir)
    written = [plot_training_curves(metrics, config.out or run_dir / CURVES_FILE, str(run_dir))]
    print(f"curves -> {written[0]}")
    if any("kl_per_answer" in m for m in metrics):
        written.append(plot_ppo_curves(metrics, written[0].with_name(PPO_CURVES_FILE), str(run_dir)))
        print(f"PPO curves -> {written[1]}")
    return written
