"""How often annotators agree: pairwise agreement and Kendall's tau over the prompts two of them ranked,
and the progress figures `chatforge label stats` prints.
"""

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from chatforge.label.database import connect, count_prompts, existing_database, stored_per_prompt, transaction

# --- agreement -------------------------------------------------------------------------------------

def concordant_pairs(a: list[int], b: list[int]) -> tuple[int, int]:
    """(concordant, discordant): of all pairs of answers, how many two rankings (best first) order the same
    way and how many the opposite way. Both rankings must order the same answers, at least two."""
    if sorted(a) != sorted(b) or len(set(a)) != len(a) or len(a) < 2:
        raise ValueError("rankings must order the same answers, each once, at least two")
    place_a = {answer: place for place, answer in enumerate(a)}
    place_b = {answer: place for place, answer in enumerate(b)}
    concordant = sum((place_a[x] < place_a[y]) == (place_b[x] < place_b[y]) for x, y in combinations(a, 2))
    return concordant, len(a) * (len(a) - 1) // 2 - concordant


def pairwise_agreement(a: list[int], b: list[int]) -> float:
    """Share of answer pairs two rankings order the same way: 1 identical, 0 reversed, 0.5 unrelated. The
    figure InstructGPT reports for its labelers (about 73%): it bounds how well a reward model trained on one
    person's comparisons can predict another's."""
    concordant, discordant = concordant_pairs(a, b)
    return concordant / (concordant + discordant)


def kendall_tau(a: list[int], b: list[int]) -> float:
    """Kendall's tau of two rankings without ties: (concordant - discordant) / pairs, from 1 (identical)
    through 0 (unrelated) to -1 (reversed)."""
    concordant, discordant = concordant_pairs(a, b)
    return (concordant - discordant) / (concordant + discordant)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def agreement(rankings: dict[object, dict[str, list[int]]]) -> dict:
    """Inter-annotator agreement. `rankings` maps each prompt to {annotator: ranking}; every two annotators
    who ranked the same prompt are one comparison, and the means weigh comparisons equally.

    Returns the overall pairwise agreement and Kendall's tau with the numbers of prompts and comparisons
    behind them, and per annotator the mean of their own comparisons (None without any): an annotator far
    below the others is worth a talk about the guidelines.
    """
    agree, tau = [], []
    per_annotator: dict[str, list[float]] = defaultdict(list)
    prompts = 0
    for by_annotator in rankings.values():
        if len(by_annotator) < 2:
            continue
        prompts += 1
        for (name_a, a), (name_b, b) in combinations(sorted(by_annotator.items()), 2):
            agree.append(pairwise_agreement(a, b))
            tau.append(kendall_tau(a, b))
            per_annotator[name_a].append(agree[-1])
            per_annotator[name_b].append(agree[-1])
    return {
        "prompts": prompts, "comparisons": len(agree),
        "pairwise_agreement": _mean(agree), "kendall_tau": _mean(tau),
        "per_annotator": {name: {"comparisons": len(v), "pairwise_agreement": _mean(v)}
                          for name, v in per_annotator.items()},
    }


def compute_stats(conn: sqlite3.Connection, per_prompt: int) -> dict:
    """Progress per annotator and overall, and agreement: what /api/stats and `chatforge label stats` show."""
    with transaction(conn, "DEFERRED"):
        names = [row["name"] for row in conn.execute("SELECT name FROM annotators ORDER BY name")]
        rows = conn.execute("SELECT r.prompt_id, a.name, r.ranking FROM rankings r "
                            "JOIN annotators a ON a.id = r.annotator_id").fetchall()
        prompts = count_prompts(conn)
    by_prompt: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for row in rows:
        by_prompt[row["prompt_id"]][row["name"]] = json.loads(row["ranking"])
    submitted = defaultdict(int)
    for row in rows:
        submitted[row["name"]] += 1
    overall = agreement(by_prompt)
    per_annotator = overall.pop("per_annotator")
    return {
        "per_prompt": per_prompt,
        "prompts": prompts,
        "complete_prompts": sum(len(r) >= per_prompt for r in by_prompt.values()),
        "rankings": len(rows),
        "annotators": [{"name": name, "rankings": submitted[name],
                        **per_annotator.get(name, {"comparisons": 0, "pairwise_agreement": None})} for name in names],
        "agreement": overall,
    }


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_stats(stats: dict) -> str:
    """The stats as text for the terminal."""
    agree = stats["agreement"]
    lines = [f"prompts: {stats['prompts']}, complete (>= {stats['per_prompt']} rankings): {stats['complete_prompts']}, "
             f"rankings: {stats['rankings']}",
             f"agreement over {agree['prompts']} prompts ranked by 2+ annotators ({agree['comparisons']} comparisons): "
             f"pairwise {_fraction(agree['pairwise_agreement'])}, Kendall's tau {_fraction(agree['kendall_tau'])}",
             f"{'annotator':<24} {'rankings':>8} {'comparisons':>11} {'agreement':>9}"]
    for a in stats["annotators"]:
        lines.append(f"{a['name']:<24} {a['rankings']:>8} {a['comparisons']:>11} {_fraction(a['pairwise_agreement']):>9}")
    return "\n".join(lines)


def database_stats(db: str | Path, per_prompt: int | None = None) -> dict:
    with connect(existing_database(db)) as conn:
        return compute_stats(conn, per_prompt or stored_per_prompt(conn))


@dataclass
class StatsConfig:
    db: str = field(default="", metadata={"help": "SQLite database of prompts, annotators and rankings", "required": True, "metavar": "FILE"})
    per_prompt: int = field(default=0, metadata={
        "help": "rankings a prompt needs to count as complete (0: the last serve's --per-prompt)"})


def print_stats(config: StatsConfig) -> dict:
    """`chatforge label stats`: progress and agreement, printed; the figures."""
    stats = database_stats(config.db, config.per_prompt or None)
    print(format_stats(stats))
    return stats

