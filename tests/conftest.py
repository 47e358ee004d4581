"""Shared fixtures: the zero-install sample corpus, a small tokenizer trained on it, and its token shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.data import nonempty_documents, prepare, write_sample_corpus
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


def run_cli(*args, check: bool = True, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`chatforge ARGS` in a real subprocess."""
    result = subprocess.run([sys.executable, "-m", "chatforge", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"chatforge {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad-input failure: non-zero exit, one line on stderr that names the problem, no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatforge: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
