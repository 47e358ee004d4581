import json

from chatforge.sources import stdlib_docstrings, write_sample_corpus

from conftest import run_cli


def test_every_command_explains_itself():
    top = run_cli("--help").stdout
    for command in ("tokenizer", "data", "pretrain", "generate"):
        assert command in top
    for args, options in [
        (["tokenizer", "train"], ["--vocab-size", "--out", "--field", "--min-frequency"]),
        (["data", "prepare"], ["--tokenizer", "--out", "--field", "--val-fraction", "--shard-tokens", "--workers"]),
        (["data", "sample-corpus"], ["--out", "--docstrings"]),
        (["generate"], ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]),
    ]:
        text = run_cli(*args, "--help").stdout
        for option in options:
            assert option in text, (args, option)


def test_sample_corpus_is_python_documentation(tmp_path):
    names = dict(stdlib_docstrings())
    assert "json" in names and "JSON" in names["json"]  # a module docstring
    assert not any(name.startswith("test.") for name in names)
    path, count = write_sample_corpus(tmp_path / "c.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert count == len(records) > 1000
    assert records[0]["source"].startswith("topic:") and records[-1]["source"].startswith("docstring:")
    assert all(r["text"].strip() for r in records)


def test_a_table_keeps_its_commands_defaults_and_derives_the_rest_from_what_is_given():
    """`chat` samples 256 tokens unless told otherwise, whatever else is set; a preset's smaller model gets
    the feed-forward width of its own d_model, not the default model's."""
    from chatforge import config as cfg
    from chatforge.chat import ChatConfig
    from chatforge.model import GPTConfig
    from chatforge.pretrain import PretrainConfig

    sampling = cfg.from_dict(ChatConfig, {"sampling": {"temperature": 0.5}}).sampling
    assert (sampling.max_new_tokens, sampling.temperature) == (256, 0.5)
    model = cfg.from_dict(PretrainConfig, {"model": {"d_model": 64, "n_head": 4}}).model
    assert model.ffn_hidden == GPTConfig(d_model=64, n_head=4).ffn_hidden != GPTConfig().ffn_hidden
