"""Generation throughput: chatforge's KV-cache engine vs a naive loop vs Hugging Face `generate`.

    python bench/generate_throughput.py            # cpu preset model, batch 1, 8 and 32, 128 new tokens
    python bench/generate_throughput.py --model smollm2 --batch-sizes 1 8     # SmolLM2-135M-Instruct
    python bench/generate_throughput.py --lora-r 16 --batch-sizes 1 8         # unmerged adapters (peft on both)

Side by side in one run, on the same weights (the `cpu` preset's architecture, random weights: speed does
not depend on them): tokens/s of
- chatforge `generate_batch` (one prefill, then one token per step with the KV cache),
- a naive loop that runs the whole sequence through the model for every new token (no cache),
- `transformers` `LlamaForCausalLM.generate` on an identical Llama built from the same weights (greedy,
  KV cache on, exactly 128 new tokens). Install `transformers` for this part (`pip install -e .[test]`).
Prints a table (medians of --repeats) and writes bench/results/generate_throughput.json. chatforge's time
includes laying out the decoding step's weights, which every generation does at its start; that cost alone
is printed too, against a batch-1 generation.

Target: chatforge >= 2x `transformers` generate at batch 1 and batch 8 on CPU, for the cpu preset and SmolLM2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chatforge import config as cfg
from chatforge.engine import DecodeStep, SamplingParams, generate_batch
from chatforge.interop import read_model
from chatforge.model import GPT, hf_llama_config, hf_state_dict
from chatforge.pretrain import PretrainConfig
from chatforge.runtime import pick_device
from timing import seconds, timed, write_report  # bench/timing.py


@torch.no_grad()
def naive_generate(model: GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = prompts
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.shape[1]:]


def with_random_adapters(model: GPT, hf, r: int):
    """LoRA adapters of rank r on every projection, B random (peft starts it at 0, which would hide nothing)."""
    import peft

    from chatforge.lora import PROJECTIONS, add_adapters

    model = add_adapters(model, r, 2.0 * r, 0.0, list(PROJECTIONS), Path("."))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    if hf is not None:
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=list(PROJECTIONS))).eval()
        ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        hf.load_state_dict({f"base_model.model.model.{k}": v for k, v in ours.items()}, strict=False)
    return model.eval(), hf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="model architecture from this preset (default: cpu)")
    parser.add_argument("--model", help="a real model instead of the preset's random one: smollm2, a Hugging Face "
                                        "folder or a GGUF file (as `chatforge import` reads them)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lora-r", type=int, default=0, help="unmerged LoRA adapters of this rank on both sides (0: none)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--device", default="cpu", help="cpu (the target's setting), cuda, or auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, taken in turns (median)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_throughput.json"))
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    torch.manual_seed(0)
    if args.model:
        model = read_model(args.model)[0].to(device).eval()
        config, args.vocab_size = model.config, model.config.vocab_size
    else:
        config = cfg.from_dict(PretrainConfig, cfg.load_preset(args.preset, "pretrain")).model
        config.vocab_size = args.vocab_size
        model = GPT(config).to(device).eval()
    try:
        import transformers
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(config))).to(device).eval()
        hf.load_state_dict(hf_state_dict(model), strict=False)
        # no end-of-text token, as on chatforge's side: exactly --new-tokens greedy tokens, none suppressed
        # (LlamaConfig's default eos id 2 with min_new_tokens masked that token, which chatforge may pick)
        hf.generation_config.pad_token_id, hf.generation_config.eos_token_id = 0, None
    except ImportError:
        hf = None
        print("transformers is not installed: its column is left out")
    if args.lora_r:  # the same random adapters, unmerged, on both sides: chatforge's through peft, and peft's own
        model, hf = with_random_adapters(model, hf, args.lora_r)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_tokens)).to(device)
        prompt_lists = prompts.tolist()
        tokens = batch * args.new_tokens
        ours = generate_batch(model, prompt_lists, params)
        assert all(len(c[0].tokens) == args.new_tokens for c in ours)
        fns = {"chatforge": lambda: generate_batch(model, prompt_lists, params)}
        if hf is not None:
            def hf_generate():
                with torch.no_grad():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                       max_new_tokens=args.new_tokens, use_cache=True)
            fns["hf"] = hf_generate
        medians = timed(fns, args.repeats)
        row = {"batch": batch, "new_tokens": args.new_tokens, "chatforge_tok_s": tokens / medians["chatforge"],
               "naive_tok_s": tokens / seconds(lambda: naive_generate(model, prompts, args.new_tokens))}
        if hf is not None:
            same = hf_generate()[:, args.prompt_tokens:].tolist() == [c[0].tokens for c in ours]
            row.update(hf_tok_s=tokens / medians["hf"], hf_same_tokens=same)
            row["speedup_vs_hf"] = row["chatforge_tok_s"] / row["hf_tok_s"]
        row["speedup_vs_naive"] = row["chatforge_tok_s"] / row["naive_tok_s"]
        rows.append(row)
        hf_text = (f"  transformers {row['hf_tok_s']:8,.0f} tok/s  x{row['speedup_vs_hf']:.2f} vs HF"
                   f" (same tokens: {row['hf_same_tokens']})") if hf is not None else ""
        print(f"batch {batch:3d}: chatforge {row['chatforge_tok_s']:8,.0f} tok/s  naive {row['naive_tok_s']:8,.0f} tok/s"
              f"  x{row['speedup_vs_naive']:.1f} vs naive{hf_text}", flush=True)
    medians = timed({"layout": lambda: DecodeStep(model),
                     "batch1": lambda: generate_batch(model, prompt_lists[:1], params)}, args.repeats)
    layout_share = medians["layout"] / medians["batch1"]
    print(f"laying out the decoding weights, once per generation: {1e3 * medians['layout']:.2f} ms, "
          f"{layout_share:.1%} of a batch-1 generation of {args.new_tokens} tokens", flush=True)
    write_report(args.out, rows, preset=args.preset, model=args.model, lora_r=args.lora_r, device=str(device), params_M=model.num_params() / 1e6,
                 layout_ms=1e3 * medians["layout"], layout_share_of_batch1=layout_share)


if __name__ == "__main__":
    main()
