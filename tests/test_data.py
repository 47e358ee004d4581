import json

import numpy as np
import pytest

from chatforge.data import TokenWindows, is_validation, load_meta, load_splits, prepare
from chatforge.sources import nonempty_documents
from chatforge.errors import UserError
from chatforge.tokenizer import Tokenizer

from conftest import assert_one_line_error, run_cli


def expected_splits(sources, tokenizer_dir, val_fraction, seed=0, field="text"):
    """The token streams `prepare` must write, computed the slow obvious way."""
    tok = Tokenizer.load(tokenizer_dir)
    streams = {"train": [], "val": []}
    for i, doc in enumerate(nonempty_documents(sources, field)):
        split = "val" if is_validation(i, val_fraction, seed) else "train"
        streams[split] += [tok.bos_id, *tok.encode(doc)]
    return streams


def read_split(data_dir, split):
    meta = load_meta(data_dir)
    return np.concatenate([np.load(data_dir / s["file"]) for s in meta["splits"][split]["shards"]])


def test_prepare_writes_exactly_the_tokenized_documents(corpus, tokenizer_dir, data_dir):
    meta = load_meta(data_dir)
    expected = expected_splits([corpus], tokenizer_dir, val_fraction=0.1)
    total_docs = sum(1 for _ in nonempty_documents([corpus]))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == total_docs
    for split in ("train", "val"):
        tokens = read_split(data_dir, split)
        assert tokens.dtype == np.uint16  # the vocab fits
        assert meta["splits"][split]["tokens"] == len(tokens) == len(expected[split])
        assert tokens.tolist() == expected[split]
    assert meta["splits"]["val"]["documents"] >= 1


def test_shards_and_windows_across_shard_boundaries(corpus, tokenizer_dir, tmp_path, data_dir):
    out = tmp_path / "small-shards"
    prepare([corpus], tokenizer_dir, out, val_fraction=0.1, shard_tokens=5000, workers=1, progress=False)
    meta = load_meta(out)
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 5000 for s in meta["splits"]["train"]["shards"])
    assert read_split(out, "train").tolist() == read_split(data_dir, "train").tolist()  # worker/shard count don't matter
    windows = TokenWindows(out, "train", seq_len=64)
    everything = read_split(out, "train")
    for start in (0, 4990, 4999, 5000, 9950, windows.num_windows - 1):
        assert windows.window(start).tolist() == everything[start : start + 65].tolist()


def test_windows_are_a_pure_function_of_seed_and_index(data_dir):
    a = TokenWindows(data_dir, "train", seq_len=32, seed=5)
    b = TokenWindows(data_dir, "train", seq_len=32, seed=5)
    x1, y1 = a.batch(7, 8)
    x2, y2 = b.batch(7, 8)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are the inputs shifted by one
    assert not (a.batch(8, 8)[0] == x1).all()
    halves = [a.batch(7, 8, slice(0, 4))[0], a.batch(7, 8, slice(4, 8))[0]]
    assert (np.concatenate(halves) == x1.numpy()).all()  # two ranks' rows make up the global batch
    seq = TokenWindows(data_dir, "val", seq_len=32, mode="sequential")
    assert seq.starts(1, 4).tolist() == [128, 160, 192, 224]


def test_sources_txt_folders_jsonl_parquet_and_custom_field(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    docs = [f"Document number {i}. " * 20 for i in range(12)]
    for i in range(4):
        (folder / "sub" / f"{i}.txt").write_text(docs[i])
    with (tmp_path / "more.jsonl").open("w") as f:
        for d in docs[4:8]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
        f.write("\n")  # blank lines are allowed
    pq.write_table(pa.table({"body": docs[8:]}), tmp_path / "rest.parquet")
    sources = [folder, tmp_path / "more.jsonl", tmp_path / "rest.parquet"]
    assert list(nonempty_documents(sources, "body")) == docs
    result = prepare(sources, tokenizer_dir, tmp_path / "out", field="body", val_fraction=0.25, workers=2, progress=False)
    expected = expected_splits(sources, tokenizer_dir, 0.25, field="body")
    for split in ("train", "val"):
        assert read_split(result.out, split).tolist() == expected[split]


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "missing.txt", ["missing.txt", "does not exist"]),
        (lambda d: (d / "empty.jsonl").write_text("\n") and d / "empty.jsonl", ["is empty"]),
        (lambda d: (d / "blank.txt").write_text("   \n") and d / "blank.txt", ["is empty"]),
        (lambda d: (d / "latin1.txt").write_bytes("café".encode("latin-1")) and d / "latin1.txt",
         ["latin1.txt", "not valid UTF-8", "0xe9", "offset 3"]),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n') and d / "bad.jsonl",
         ["bad.jsonl:2", "not valid JSON"]),
        (lambda d: (d / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n') and d / "nofield.jsonl",
         ["nofield.jsonl:2", "'text' field"]),
    ],
)
def test_bad_corpus_gives_a_one_line_error(tmp_path, tokenizer_dir, make, fragments):
    source = make(tmp_path)
    result = run_cli("data", "prepare", source, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", "--no-progress",
                     check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no half-written data left behind
    if any("JSON" in f or "UTF-8" in f for f in fragments):  # the tokenizer reads sources the same way
        result = run_cli("tokenizer", "train", source, "--out", tmp_path / "tok", check=False)
        assert_one_line_error(result, *fragments)


def test_too_few_documents_for_a_validation_split(tmp_path, tokenizer_dir):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(UserError, match="too few for a train and a validation split"):
        prepare([tmp_path / "one.txt"], tokenizer_dir, tmp_path / "out", progress=False)


def test_prepare_never_replaces_a_folder_that_is_not_prepared_data(corpus, tokenizer_dir, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = run_cli("data", "prepare", corpus, "--tokenizer", tokenizer_dir, "--out", precious, "--no-progress", check=False)
    assert_one_line_error(result, "not a prepared data folder", "refusing")
    assert (precious / "keep.txt").read_text() == "mine"


def test_jsonl_lines_are_split_on_newlines_only(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False) + "\n")
    assert list(nonempty_documents([path])) == ["a\u2028b\u0085c"]


def test_held_out_items_are_never_trained_on():
    items = [f"item {i}" for i in range(5)]
    assert not any(is_validation(i, 0.01, 0) for i in range(5))  # the draw holds nothing out of so few
    train, val, _ = load_splits(lambda paths: (items, 0), ["x"], [], 0.01, seed=0)
    assert val == ["item 4"] and train == items[:4]  # the last item moved out of training
    keyed = ["a", "b", "c", "b"]  # items sharing a key stay on one side
    train, val, _ = load_splits(lambda paths: (keyed, 0), ["x"], [], 0.01, seed=0, key=lambda x: x)
    assert val == ["b", "b"] and train == ["a", "c"]
    assert load_splits(lambda paths: (items, 0), ["x"], [], 0.0, seed=0)[:2] == (items, [])  # nothing held out
    with pytest.raises(UserError, match="x: 1 item"):
        load_splits(lambda paths: (["only"], 0), ["x"], [], 0.1, seed=0)
