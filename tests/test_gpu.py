"""The CUDA paths: bf16 decoding with the KV cache, training under autocast, compiled training, generation,
PPO, reward training and serving in bf16.

Skipped where there is no GPU (CI); run on a GPU machine with `pytest tests/test_gpu.py`.
"""

import pytest
import torch

from chatforge import config as cfg
from chatforge.engine import SamplingParams, generate_batch, new_cache
from chatforge.model import GPT, GPTConfig
from chatforge.pretrain import PretrainConfig, pretrain
from chatforge.train import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = GPTConfig(vocab_size=512, n_layer=2, d_model=128, n_head=4, n_kv_head=2, max_seq_len=64)


def test_bf16_kv_cache_decoding_follows_the_full_forward_pass():
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (3, 40), device="cuda")
    with torch.inference_mode():
        full = model(idx).float()
        cache = new_cache(model, 3, 40)
        pieces = [model(idx[:, :9], cache)] + [model(idx[:, t:t + 1], cache) for t in range(9, 40)]
    incremental = torch.cat(pieces, dim=1).float()
    # bf16 rounds differently in one pass and in pieces: compare distributions, not bits
    assert (incremental.softmax(-1) - full.softmax(-1)).abs().max() < 2e-2
    assert (incremental.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_batched_generation_on_gpu_equals_one_prompt_at_a_time():
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()  # fp32: greedy ties are then as rare as on CPU
    prompts = [[5, 6, 7], [8] * 11, [9, 10]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = [c[0].tokens for c in generate_batch(model, prompts, params)]
    alone = [generate_batch(model, [p], params)[0][0].tokens for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("compile", [False, True])
def test_pretraining_in_bf16_lowers_the_loss(data_dir, tmp_path, compile):
    config = cfg.from_dict(PretrainConfig, cfg.merge(cfg.load_preset("tiny", "pretrain"), {
        "data": str(data_dir), "out": str(tmp_path / "run"), "max_steps": 30, "progress": False,
        "device": "cuda", "dtype": "bfloat16", "compile": compile, "eval_every": 30, "checkpoint_every": 30}))
    pretrain(config)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 30 and max(losses[-5:]) < losses[0] - 0.5



def chat_setup(pretrained, root):
    """The tiny pretrained model as the SFT policy, a reward model from it (a random scalar head), prompts."""
    from chatforge.checkpoint import load_model, save_checkpoint
    from chatforge.model import with_head

    policy, tokenizer, _ = load_model(pretrained)
    torch.manual_seed(0)
    reward = with_head(policy, "scalar")
    torch.nn.init.normal_(reward.score.weight, std=0.5)
    save_checkpoint(root / "rm", reward, tokenizer)
    (root / "prompts.txt").write_text("".join(f"Tell me about thing {i}.\n" for i in range(40)))
    return root / "rm", root / "prompts.txt"


@pytest.mark.parametrize("compile", [False, True])
def test_ppo_in_bf16_on_gpu(pretrained, tmp_path, compile):
    """PPO's iterations (rollouts, scoring, minibatch updates; compiled or not) under bf16 autocast with fp32
    weights: finite numbers, no skipped update, ratios near 1 in the first epoch, a checkpoint that loads."""
    from chatforge.checkpoint import load_model
    from chatforge.ppo import PPOConfig, train_ppo

    rm, prompts = chat_setup(pretrained, tmp_path)
    config = cfg.from_dict(PPOConfig, cfg.merge(cfg.load_preset("tiny", "ppo"), {
        "policy": str(pretrained), "reward": str(rm), "prompts": [str(prompts)], "out": str(tmp_path / "ppo"),
        "max_steps": 3, "eval_every": 3, "progress": False, "device": "cuda", "dtype": "bfloat16", "compile": compile}))
    train_ppo(config)
    steps = [m for m in read_metrics(tmp_path / "ppo") if "kl_per_answer" in m]
    assert len(steps) == 3 and not [m for m in steps if m.get("alarms")]
    for m in steps:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("reward", "kl", "loss", "value_loss", "grad_norm"))
        assert m["skipped_updates"] == 0
    assert steps[0]["approx_kl"] < 0.05  # bf16 rounds the scoring and the update's passes differently
    policy, _, _ = load_model(tmp_path / "ppo")
    assert next(policy.parameters()).dtype == torch.float32  # the master weights stay fp32


def test_reward_training_in_bf16_on_gpu(pretrained, tmp_path):
    from conftest import keyword_rankings, write_jsonl
    from chatforge.reward import RewardConfig, train_reward_model

    data = write_jsonl(tmp_path / "rankings.jsonl", keyword_rankings(64, 3, seed=0))
    config = cfg.from_dict(RewardConfig, cfg.merge(cfg.load_preset("tiny", "reward"), {
        "init": str(pretrained), "data": [str(data)], "out": str(tmp_path / "rm"), "epochs": 0, "max_steps": 40,
        "eval_every": 40, "progress": False, "device": "cuda", "dtype": "bfloat16"}))
    train_reward_model(config)
    metrics = read_metrics(tmp_path / "rm")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 40 and sum(losses[-10:]) < sum(losses[:10])  # the keyword is learnt
    assert metrics[-1]["val_accuracy"] > 0.6


def test_serving_in_bf16_on_gpu(pretrained, tmp_path):
    """`chatforge serve --device cuda` loads the weights in bf16 (the default on a GPU) and answers."""
    import json
    import urllib.request

    from conftest import ServerProcess

    server = ServerProcess(tmp_path / "serve.log", "serve", pretrained, "--device", "cuda")
    try:
        body = json.dumps({"model": pretrained.resolve().name, "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell me a thing."}]}).encode()
        request = urllib.request.Request(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert "bfloat16" in (tmp_path / "serve.log").read_text()

