"""Crash-safe writes (chatforge/files.py): every file and folder is found whole, old or new, after a SIGKILL.

SIGKILL tests the rename protocol: a killed process's writes stay in the page cache, so a file written
without fsync still reads back whole here; fsync is what protects against a power loss, which a test
cannot cut. What SIGKILL does catch is a writer that truncates in place, or a folder swap that deletes
the old folder before the new one is in place.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.checkpoint import (load_model, load_trainer_state, prune_checkpoints, save_checkpoint,
                                  step_checkpoints, step_dir)
from chatforge.config import save_json
from chatforge.data import TokenWindows, load_data_tokenizer, load_meta, prepare
from chatforge.files import atomic_dir, atomic_open, atomic_write, current_dir, recover_dir
from chatforge.model import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

KILLS = 20  # per kind of state: 80 kills in all, a few seconds
fork = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _write_forever(write, versions: list, first: int, started) -> None:
    started.set()
    for i in range(first, first + (1 << 30)):
        write(versions[i % 2])


def kill_repeatedly(target: Path, write, versions: list, check, kills: int = KILLS, seed: int = 0) -> None:
    """Write both versions to `target`, then `kills` times: fork a child that writes the two versions in turn
    (the other one first), SIGKILL it after a random pause of up to a few writes, and `check()` that the
    state reads back whole as one of them (`check` returns its index). The pauses scale with how long a write
    takes here, so on a slow disk too some kills land mid-write and some children complete writes."""
    if fork is None:
        pytest.skip("needs fork")
    seconds = 0.0
    for version in versions:
        t0 = time.perf_counter()
        write(version)
        seconds = max(seconds, time.perf_counter() - t0)
    rng = random.Random(seed)
    found = check()
    seen, cut = {found}, 0
    started = fork.Event()
    for _ in range(kills):
        child = fork.Process(target=_write_forever, args=(write, versions, 1 - found, started), daemon=True)
        before = set(leftovers(target.parent, target.name))
        started.clear()
        child.start()
        assert started.wait(timeout=60), "the writer did not start"
        time.sleep(rng.uniform(0.2, 3) * seconds)  # from the start of its first write: fork time does not count
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        cut += bool(set(leftovers(target.parent, target.name)) - before)  # a new temporary: the kill cut a write
        found = check()
        seen.add(found)
    assert seen == {0, 1} and cut > 0, f"the kills did not test much: saw versions {seen}, {cut} writes cut"


def leftovers(folder: Path, name: str) -> list[Path]:
    """The temporary (or set-aside) files and folders of writes to `folder/name`."""
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


# --- files -----------------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_and_keeps_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two"
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_open(target, "a"):
        pass


def test_done_json_is_old_or_new_after_each_kill(tmp_path):
    path = tmp_path / "done.json"
    versions = [{"version": v, "pad": v * 200_000} for v in "ab"]  # long enough to be killed mid-write
    kill_repeatedly(path, lambda v: save_json(v, path), versions, lambda: versions.index(json.loads(path.read_text())))


# --- folders ---------------------------------------------------------------------------------------

def fill(folder: Path, version: str) -> None:
    for i in range(3):
        (folder / f"part{i}").write_text(version * 1000)


def read_version(folder: Path) -> str:
    parts = {(folder / f"part{i}").read_text() for i in range(3)}
    assert len(parts) == 1, "a mix of two versions"
    return parts.pop()[0]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_folder_swap_cut_between_its_renames_is_read_and_then_recovered(tmp_path):
    path = tmp_path / "data"
    with atomic_dir(path) as tmp:
        fill(tmp, "a")
    pid = dead_pid()
    os.rename(path, tmp_path / f".data.old-{pid}")  # as a writer killed between its two renames leaves it
    (tmp_path / f".data.tmp-{pid}").mkdir()  # with its complete or half-written new version
    assert read_version(current_dir(path)) == "a"
    recover_dir(path)  # what the next writer does first: the old version back under its name
    assert read_version(path) == "a"
    assert leftovers(tmp_path, "data") == []
    with atomic_dir(path) as tmp:
        fill(tmp, "b")
    assert read_version(path) == "b"
    assert leftovers(tmp_path, "data") == []


def test_a_failed_folder_write_leaves_the_old_folder(tmp_path):
    path = tmp_path / "data"
    with atomic_dir(path) as tmp:
        fill(tmp, "a")
    with pytest.raises(RuntimeError), atomic_dir(path) as tmp:
        fill(tmp, "b")
        raise RuntimeError("writer failed")
    assert read_version(path) == "a"
    assert leftovers(tmp_path, "data") == []


def test_folder_swaps_are_old_or_new_after_each_kill(tmp_path):
    path = tmp_path / "folder"

    def write(version):
        with atomic_dir(path) as tmp:
            fill(tmp, version)

    kill_repeatedly(path, write, ["a", "b"], lambda: "ab".index(read_version(current_dir(path))), seed=1)


# --- checkpoints -----------------------------------------------------------------------------------

def test_a_resaved_checkpoint_is_old_or_new_after_each_kill(tmp_path, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=32)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(GPT(config))
    run = tmp_path / "run"
    step = step_dir(run, 7)  # the same step, re-saved over and over (as a resumed run does)

    def write(version: int) -> None:
        save_checkpoint(step, models[version], tokenizer, trainer_state={"version": version},
                        extra={"tag": version})

    def check() -> int:
        [(found, path)] = step_checkpoints(run)
        model, _, loaded = load_model(run)
        version = load_trainer_state(loaded)["version"]
        assert found == 7 and loaded == path
        assert json.loads((loaded / "config.json").read_text())["chatforge"]["tag"] == version
        expected = models[version].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), "weights of the other version"
        return version

    kill_repeatedly(step, write, [0, 1], check, seed=2)
    os.rename(step, step.with_name(f".{step.name}.old-{dead_pid()}"))  # a kill between the two renames of a swap
    version = check()
    prune_checkpoints(run, keep=0)  # puts the set-aside step back, and clears what the killed writers left
    assert [p.name for p in step.parent.iterdir()] == [step.name] and check() == version


# --- prepared data ---------------------------------------------------------------------------------

def test_prepared_data_is_old_or_new_after_each_kill(tmp_path, corpus, tokenizer_dir, data_dir):
    out = tmp_path / "shards"
    shutil.copytree(data_dir, out)
    old_meta = load_meta(out)
    # prepare itself replaces a prepared folder through the same swap; seed 1 splits differently
    prepare([corpus], tokenizer_dir, out, val_fraction=0.1, workers=1, seed=1, progress=False)
    new_meta = load_meta(out)
    assert new_meta["seed"] == 1 and new_meta["splits"] != old_meta["splits"]
    versions = [data_dir, tmp_path / "new"]
    shutil.copytree(out, versions[1])
    tokens = [{s: np.concatenate([np.load(v / sh["file"]) for sh in load_meta(v)["splits"][s]["shards"]])
               for s in ("train", "val")} for v in versions]

    def write(version: Path) -> None:  # what prepare does once its shards are written, minus the tokenizing
        with atomic_dir(out) as tmp:
            shutil.copytree(version, tmp, dirs_exist_ok=True)

    def check() -> int:
        version = [load_meta(v)["seed"] for v in versions].index(load_meta(out)["seed"])
        for split, values in tokens[version].items():
            windows = TokenWindows(out, split, seq_len=8)
            assert windows.num_tokens == len(values)
            assert np.array_equal(np.concatenate([np.asarray(s) for s in windows.shards]), values), "a mix of versions"
        assert load_data_tokenizer(out).vocab_size == load_meta(out)["vocab_size"]
        return version

    kill_repeatedly(out, write, versions, check, seed=3)
    os.rename(out, tmp_path / f".shards.old-{dead_pid()}")  # a kill between the two renames of a swap
    check()
    write(versions[0])
    assert check() == 0 and leftovers(tmp_path, "shards") == []
