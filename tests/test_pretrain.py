import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

from chatforge import config as cfg
from chatforge.checkpoint import load_model, step_checkpoints
from chatforge.engine import SamplingParams, generate
from chatforge.errors import UserError
from chatforge.model import GPT
from chatforge.pretrain import PretrainConfig, PretrainTask, pretrain
from chatforge.runtime import Dist
from chatforge.tokenizer import Tokenizer
from chatforge.train import Trainer, lr_factor, read_metrics

from conftest import assert_one_line_error, kill_when, run_cli

# Tiny but not trivial: GQA, 2 micro-batches per step, checkpoints every 10 steps.
TINY = ["--preset", "tiny", "--max-steps", 30, "--checkpoint-every", 10, "--eval-every", 10, "--keep-checkpoints", 5,
        "--no-progress"]
# dropout draws from the RNG every step: exact resume then needs the RNG state restored too
TINY_DROPOUT = [*TINY, "--dropout", 0.1]


def train_losses(run_dir):
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def val_losses(run_dir):
    return [(m["step"], m["val_loss"]) for m in read_metrics(run_dir) if "val_loss" in m]


def test_tiny_pretraining_lowers_validation_loss(data_dir, tmp_path):
    preset = cfg.load_preset("tiny", "pretrain")
    config = cfg.from_dict(PretrainConfig, cfg.merge(preset, {"data": str(data_dir), "out": str(tmp_path / "run"),
                                                              "max_steps": 60, "eval_every": 30, "progress": False}))
    run_dir = pretrain(config)
    vals = val_losses(run_dir)
    assert [s for s, _ in vals] == [0, 30, 60]
    assert vals[-1][1] < vals[0][1] - 1.0, vals  # from ~ln(512) = 6.2 by more than a nat
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    assert all(m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 for m in train)
    assert "samples" in metrics[0] and len(metrics[0]["samples"]) == 2
    assert [step for step, _ in step_checkpoints(run_dir)] == [40, 60]  # every 20 steps, the newest 2 kept
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run_dir / "curves.png").unlink()
    assert "curves ->" in run_cli("plot", run_dir).stdout and (run_dir / "curves.png").stat().st_size > 10_000


def test_a_non_finite_loss_skips_the_update(data_dir, tmp_path):
    """One poisoned batch must not reach the weights: the step is logged as skipped and nothing changes."""
    config = cfg.from_dict(PretrainConfig, cfg.merge(cfg.load_preset("tiny", "pretrain"), {
        "data": str(data_dir), "out": str(tmp_path / "run"), "max_steps": 3, "progress": False}))
    config.model = dataclasses.replace(config.model, vocab_size=512)
    model = GPT(config.model)
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    task = PretrainTask(config, tokenizer, Dist(), torch.device("cpu"))
    clean_loss = task.loss
    task.loss = lambda m, batch: clean_loss(m, batch) * (float("nan") if trainer.step == 1 else 1.0)
    trainer = Trainer(config, model, tokenizer, task, d=Dist(), device=torch.device("cpu"), dtype=torch.float32,
                      stage="test", run_config={})
    assert "skipped" not in trainer.train_step()
    before = [p.detach().clone() for p in model.parameters()]
    record = trainer.train_step()
    assert record["skipped"] and record["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "skipped" not in trainer.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_model_sees_one_checkpoint_format_everywhere(data_dir, tmp_path):
    """A checkpoint is a Hugging Face Llama folder: transformers loads it unconverted, same logits."""
    transformers = pytest.importorskip("transformers")
    run_cli("pretrain", *TINY, "--max-steps", 10, "--data", data_dir, "--out", tmp_path / "run")
    model, tokenizer, path = load_model(tmp_path / "run")
    assert path.name == "step_000010"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("The for statement")]])
    assert hf_tok.encode("The for statement", add_special_tokens=False) == ids[0, 1:].tolist()
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() < 1e-4
    # generate: the KV-cache greedy output equals argmax decoding with full forward passes
    out = generate(model, ids[0].tolist(), SamplingParams(max_new_tokens=12, temperature=0))
    seq = ids[0].tolist()
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[ids.shape[1]:]
    result = run_cli("generate", tmp_path / "run", "--prompt", "The for statement", "--max-new-tokens", 12,
                     "--temperature", 0)
    assert result.stdout.startswith("The for statement" + tokenizer.decode(out, skip_special=True))


def test_kill_and_resume_gives_exactly_the_uninterrupted_losses(data_dir, tmp_path):
    reference = tmp_path / "reference"
    run_cli("pretrain", *TINY_DROPOUT, "--data", data_dir, "--out", reference)

    killed = tmp_path / "killed"
    kill_when("pretrain", *TINY_DROPOUT, "--data", data_dir, "--out", killed, ready=lambda: step_checkpoints(killed))
    done = [step for step, _ in step_checkpoints(killed)]
    assert done and done[-1] < 30, f"killed after {done}: the run should have been cut mid-way"
    # a crash during a checkpoint write leaves only a temporary folder, which resume ignores
    shutil.copytree(step_checkpoints(killed)[-1][1], killed / "checkpoints" / ".step_000090.tmp-1")
    (killed / "checkpoints" / ".step_000090.tmp-1" / "model.safetensors").write_bytes(b"half")

    result = run_cli("pretrain", "--resume", killed, "--no-progress")
    assert f"resuming at step {done[-1]}" in result.stdout
    assert train_losses(killed) == train_losses(reference)  # exact, step for step
    assert val_losses(killed) == val_losses(reference)
    assert len(train_losses(killed)) == 30


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(data_dir, tmp_path, sharding):
    """Same global batch (8 sequences): 1 process x 2 micro-batches vs 2 processes x 1, the model copied to
    each (DDP) or sharded over them (FSDP2); losses within 1e-4, and the same weights in the checkpoint (with
    FSDP, gathered from the shards)."""
    common = ["--preset", "tiny", "--max-steps", 8, "--eval-every", 4, "--checkpoint-every", 8, "--no-progress",
              "--data", data_dir, "--batch-size", 8, "--micro-batch-size", 4]
    run_cli("pretrain", *common, "--out", tmp_path / "one")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "chatforge",
         "pretrain", *map(str, common), *sharding, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("pretrain:") == 1  # rank 0 alone logs
    if sharding:  # the optimizer state in one file per process
        assert len(list((step_checkpoints(tmp_path / "two")[-1][1] / "optimizer").glob("*.distcp"))) == 2
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (_, a), (_, b) in zip(one + val_losses(tmp_path / "one"), two + val_losses(tmp_path / "two")):
        assert a == pytest.approx(b, abs=1e-4)
    a, _, _ = load_model(tmp_path / "one")
    b, _, _ = load_model(tmp_path / "two")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)


def test_bf16_training_under_fsdp_follows_one_process(data_dir, tmp_path):
    """bf16 autocast (on CPU, standing in for a GPU): FSDP2's gathers move bf16 weights, its shards and
    AdamW stay fp32, and the losses follow one process's bf16 run (to bf16's rounding)."""
    from conftest import run_torchrun

    common = ["--preset", "tiny", "--max-steps", 6, "--eval-every", 6, "--checkpoint-every", 6, "--no-progress",
              "--data", data_dir, "--batch-size", 8, "--micro-batch-size", 2, "--dtype", "bfloat16"]
    run_cli("pretrain", *common, "--out", tmp_path / "one")
    run_torchrun("pretrain", *common, "--fsdp", "--out", tmp_path / "two")
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, abs=5e-3)
    assert one[-1][1] < one[0][1] - 0.1  # and it learns
    assert load_model(tmp_path / "two")[0].lm_head.weight.dtype == torch.float32


def test_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(data_dir, tmp_path):
    """An FSDP run of 2 processes, resumed from its step-4 checkpoint (the optimizer state sharded in 2
    files) on 2 processes and on 1 (resharded by torch.distributed.checkpoint): both end where the
    uninterrupted run ends."""
    from conftest import run_torchrun

    common = ["--preset", "tiny", "--max-steps", 8, "--eval-every", 4, "--checkpoint-every", 4, "--keep-checkpoints", 0,
              "--no-progress", "--data", data_dir, "--batch-size", 8, "--micro-batch-size", 2]
    run_torchrun("pretrain", *common, "--fsdp", "--out", tmp_path / "whole")
    for name in ("two", "one"):
        shutil.copytree(tmp_path / "whole", tmp_path / name)
        shutil.rmtree(step_checkpoints(tmp_path / name)[-1][1])  # as if killed before step 8's checkpoint
    result = run_torchrun("pretrain", "--resume", tmp_path / "two", "--no-progress")
    assert "resuming at step 4" in result.stdout
    run_cli("pretrain", "--resume", tmp_path / "one", "--no-progress")
    expected = train_losses(tmp_path / "whole")
    whole = load_model(tmp_path / "whole")[0]
    for name in ("two", "one"):
        assert [s for s, _ in train_losses(tmp_path / name)] == list(range(1, 9))
        for (step, a), (_, b) in zip(expected, train_losses(tmp_path / name)):
            assert b == pytest.approx(a, abs=1e-4), (name, step)
        resumed = load_model(tmp_path / name)[0]
        for (key, p), q in zip(whole.named_parameters(), resumed.parameters()):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=0, msg=f"{name}: {key}")


def test_bad_checkpoints_and_runs_give_one_line_errors(data_dir, tmp_path):
    assert_one_line_error(run_cli("generate", tmp_path / "nope", check=False), "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("generate", tmp_path / "empty", check=False), "neither a checkpoint")
    run_cli("pretrain", *TINY, "--max-steps", 2, "--data", data_dir, "--out", tmp_path / "run")
    assert_one_line_error(run_cli("pretrain", *TINY, "--data", data_dir, "--out", tmp_path / "run", check=False),
                          "already holds a run", "--resume")
    ckpt = step_checkpoints(tmp_path / "run")[-1][1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cli("generate", ckpt, check=False), "model.safetensors", "truncated")
    (ckpt / "tokenizer.json").unlink()
    assert_one_line_error(run_cli("generate", ckpt, check=False), "incomplete checkpoint", "tokenizer.json")
    assert_one_line_error(run_cli("pretrain", "--preset", "tiny", "--data", tmp_path / "none", "--out", tmp_path / "x",
                                  check=False), "not a prepared data folder")
    assert_one_line_error(run_cli("pretrain", "--preset", "nosuch", check=False), "preset 'nosuch' not found")
    assert_one_line_error(run_cli("pretrain", "--preset", "tiny", "--data", data_dir, "--batch-size", 6,
                                  "--out", tmp_path / "b", check=False), "multiple of micro_batch_size")
    for option, value, message in [("--n-head", 0, "n_head must be at least 1"), ("--eval-every", 0, "eval_every"),
                                   ("--dropout", 1.5, "dropout must be in [0, 1)"), ("--dtype", "float16", "dtype")]:
        assert_one_line_error(run_cli("pretrain", "--preset", "tiny", "--data", data_dir, option, value,
                                      "--out", tmp_path / "c", check=False), message)
    assert_one_line_error(run_cli("generate", tmp_path / "run", "--max-new-tokens", 0, check=False), "max_new_tokens")


def test_presets_and_command_line_overrides(tmp_path):
    for name in ("tiny", "cpu", "gpu-124m"):
        config = cfg.from_dict(PretrainConfig, cfg.load_preset(name, "pretrain"))
        assert config.model.n_layer >= 2
    merged = cfg.merge(cfg.load_preset("cpu", "pretrain"), {"lr": 0.5, "model": {"n_layer": 1}})
    config = cfg.from_dict(PretrainConfig, merged)
    assert (config.lr, config.model.n_layer, config.model.d_model) == (0.5, 1, 256)
    help_text = run_cli("pretrain", "--help").stdout
    for flag in ("--n-layer", "--d-model", "--n-kv-head", "--tie-embeddings", "--lr", "--warmup-steps", "--compile",
                 "--micro-batch-size", "--resume", "--preset", "--data", "--out"):
        assert flag in help_text
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nlr = 'fast'\n")
    with pytest.raises(UserError, match="field 'lr' must be of type float"):
        cfg.from_dict(PretrainConfig, cfg.load_preset(str(bad), "pretrain"))


def test_learning_rate_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_two_nodes_on_the_loopback_rendezvous_train_as_one_process_does(data_dir, tmp_path):
    """Two `torchrun --nnodes 2` launches (one process each), as on two machines, meeting at a c10d
    rendezvous on 127.0.0.1: a short pretraining run completes, with the 1-process run's losses."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--preset", "tiny", "--max-steps", 4, "--eval-every", 4, "--checkpoint-every", 4, "--no-progress",
              "--data", data_dir, "--batch-size", 4, "--micro-batch-size", 2]
    run_cli("pretrain", *common, "--out", tmp_path / "one")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--node-rank", str(rank),
         "-m", "chatforge", "pretrain", *map(str, common), "--out", str(tmp_path / "two")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for rank in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert sum("2 process(es)" in out for out, _ in outputs) == 1  # the global rank 0 alone logs
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, abs=1e-4)
