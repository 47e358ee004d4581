"""Peak memory per process of training one model under DDP and under FSDP2, with and without activation
checkpointing, side by side in one run.

    python bench/fsdp_memory.py                                    # 2 processes, ~100M parameters, CPU
    python bench/fsdp_memory.py --processes 8 --n-layer 24 --d-model 2048 --device cuda

Each setting runs under torchrun in fresh processes: a model of the given shape (built whole on each
process, as `chatforge pretrain` builds it), wrapped by DDP or sharded by `chatforge.sharding.shard`, AdamW,
then `--steps` training steps on random tokens. Measured on each process: the most tensor memory held at
once from wrapping on, plus the whole model's weights it started with (the allocator's peak on a GPU; the
profiler's allocation events on a CPU, `chatforge.runtime.peak_memory`). The table shows the largest over
processes, and what the arithmetic gives for the persistent state: 16 bytes per parameter for DDP (fp32
weights, gradients and AdamW's two moments), 16/N for FSDP2.
Writes bench/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]


def worker(args) -> None:
    """One process of one setting: print its peak as a JSON line."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from chatforge import sharding
    from chatforge.model import GPT, GPTConfig
    from chatforge.runtime import init_distributed, peak_memory, pick_device
    from chatforge.train import TrainConfig, make_optimizer

    device = pick_device(args.device)
    d = init_distributed(device)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                       max_seq_len=args.seq_len)
    model = GPT(config).to(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.activation_checkpointing = args.checkpointing
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len + 1), device=device,
                           generator=torch.Generator(device).manual_seed(d.rank))

    def train() -> None:
        net = model
        if args.mode == "fsdp":
            sharding.shard(model)
        else:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = make_optimizer(model, TrainConfig(), device)
        for _ in range(args.steps):
            net(tokens[:, :-1], targets=tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    _, peak = peak_memory(train, device)
    peaks = [None] * d.world_size
    dist.all_gather_object(peaks, peak)
    if d.is_main:
        print(json.dumps({"params": model.num_params(), "weights_bytes": weights, "peaks": peaks}))
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(HERE / "results" / "fsdp_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from timing import write_report  # bench/timing.py

    rows = []
    shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("n_layer", "d_model", "n_head", "vocab_size", "seq_len", "micro_batch_size", "steps", "device")]
    for mode, checkpointing in SETTINGS:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
                   __file__, "--worker", "--mode", mode, *shape, *(["--checkpointing"] if checkpointing else [])]
        threads = str(max(1, (os.cpu_count() or 1) // args.processes))
        out = subprocess.run(command, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": threads}).stdout
        result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        per_process = max(result["peaks"]) + result["weights_bytes"]
        arithmetic = 16 * result["params"] / (args.processes if mode == "fsdp" else 1)
        rows.append({"mode": mode, "activation_checkpointing": checkpointing, "params": result["params"],
                     "peak_bytes_per_process": per_process, "state_bytes_by_arithmetic": arithmetic})
    mib = 2**20
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, {args.processes} processes, {args.micro_batch_size} x "
          f"{args.seq_len} tokens per process, {args.device}\n"
          f"{'':>6} {'act. ckpt':>9} {'peak MiB/process':>17} {'weights+grads+AdamW (arithmetic)':>33}")
    for r in rows:
        print(f"{r['mode']:>6} {'on' if r['activation_checkpointing'] else 'off':>9} "
              f"{r['peak_bytes_per_process'] / mib:>17,.0f} {r['state_bytes_by_arithmetic'] / mib:>33,.0f}")
    write_report(args.out, rows, processes=args.processes, device=args.device)


if __name__ == "__main__":
    main()
