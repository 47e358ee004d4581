"""The CUDA paths: bf16 decoding with the KV cache, training under autocast, compiled training, generation.

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
