"""`chatforge label`: the human-feedback step of InstructGPT, where people rank a model's answers.

Candidates (a prompt and K >= 2 sampled completions per JSONL line) are loaded into a SQLite database; a
small web app (Starlette + uvicorn) shows each annotator a prompt and its answers in a stable random order;
the annotator ranks them best to worst, flags unacceptable ones and rates each 1-7 for helpful, honest and
harmless. `export` writes the rankings as JSONL for the reward model, `stats` reports progress and how often
annotators agree (pairwise agreement and Kendall's tau).

The database is the only state, so the server can be killed at any moment: a ranking is acknowledged only
after its transaction has committed (WAL, synchronous=FULL), and every request opens its own connection, so
concurrent requests never share one.
"""

from __future__ import annotations

from chatforge.label.app import LabelServeConfig, create_app, serve
from chatforge.label.database import (
    AnnotatorConfig, RankingsExportConfig, add_annotator, export, export_rankings, new_annotator,
)
from chatforge.label.stats import StatsConfig, database_stats, format_stats, print_stats

__all__ = ["AnnotatorConfig", "LabelServeConfig", "RankingsExportConfig", "StatsConfig", "add_annotator", "create_app",
           "database_stats", "export", "export_rankings", "format_stats", "new_annotator", "print_stats", "serve"]
