"""Pretraining throughput and MFU, measured side by side with this machine's matmul peak.

    python bench/pretrain_throughput.py                        # CPU: the cpu preset and a wider model, fp32
    python bench/pretrain_throughput.py --presets gpu-124m     # on a GPU: bf16

For each model it times real chatforge training steps (the shared Trainer: forward, backward, clipping,
AdamW) on synthetic tokens, eagerly and under torch.compile, and between models it re-measures the peak (a square matmul in the same
precision), so drift of a shared machine shows up instead of skewing the ratio. MFU = tokens/s x
FLOPs/token / peak. Prints a table and writes bench/results/pretrain_throughput.json.

Targets: on CPU, MFU >= 60% of the measured fp32 matmul peak at width >= 256; on one H100, bf16 MFU >= 45%
against the 989 TFLOP/s data-sheet peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from chatforge import config as cfg
from chatforge.model import GPT
from chatforge.pretrain import PretrainConfig
from chatforge.runtime import Dist, measure_matmul_flops, peak_flops, pick_device, pick_dtype
from chatforge.tokenizer import BOS
from chatforge.train import Task, Trainer


class SyntheticTask(Task):
    """Uniform random tokens: the same work per step as real data, with no disk in the way."""

    def __init__(self, config: PretrainConfig, device: torch.device):
        self.config, self.device = config, device
        self.seq_len = config.model.max_seq_len
        self.tokens_per_step = config.batch_size * self.seq_len
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, config.model.vocab_size, (config.batch_size, self.seq_len + 1), generator=g).to(device)

    def micro_batches(self, step, accumulation):
        return zip(self.data[:, :-1].chunk(accumulation), self.data[:, 1:].chunk(accumulation))

    def loss(self, model, batch):
        x, y = batch
        return model(x, targets=y)  # one micro-batch per step: its share is the whole loss


class _NoTokenizer:
    special = {BOS: 0}


def time_training(config: PretrainConfig, device, dtype, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config.model).to(device)
    task = SyntheticTask(config, device)
    trainer = Trainer(config, model, _NoTokenizer(), task, d=Dist(), device=device, dtype=dtype, stage="bench",
                      run_config={})
    model.train()
    times = []
    for i in range(warmup + steps):
        record = trainer.train_step()  # .item() inside synchronises the device
        if i >= warmup:
            times.append(record["step_time"])
    step_time = statistics.median(times)
    tokens_per_s = task.tokens_per_step / step_time
    return {
        "params_M": model.num_params() / 1e6,
        "flops_per_token": model.flops_per_token(task.seq_len),
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "achieved_flops": tokens_per_s * model.flops_per_token(task.seq_len),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu", "cpu-wide"],
                        help="presets to time; 'cpu-wide' is the cpu preset at d_model 512 (default: cpu cpu-wide)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled", "checkpointed"],
                        help="time each model eagerly, under torch.compile, and/or eagerly with activation "
                             "checkpointing (default: eager compiled)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="override the preset's micro batch")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretrain_throughput.json"))
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    rows = []
    for name, mode in [(n, m) for n in args.presets for m in args.modes]:
        preset = cfg.load_preset("cpu" if name == "cpu-wide" else name, "pretrain")
        if name == "cpu-wide":
            preset = cfg.merge(preset, {"model": {"d_model": 512, "n_head": 8, "n_kv_head": 4}})
        config = cfg.from_dict(PretrainConfig, preset)
        config.compile = mode == "compiled"
        config.activation_checkpointing = mode == "checkpointed"
        if args.micro_batch_size:
            config.micro_batch_size = args.micro_batch_size
        config.batch_size = config.micro_batch_size  # one micro-batch per timed step
        config.model = dataclasses.replace(config.model, vocab_size=8192 if device.type == "cpu" else 32768)
        matmul = measure_matmul_flops(device, dtype, size=2048 if device.type == "cuda" else 1024, seconds=2)
        peak = peak_flops(device, dtype) if device.type == "cuda" else matmul
        result = time_training(config, device, dtype, args.steps, args.warmup)  # writes nothing: no fit()
        result.update(preset=name, d_model=config.model.d_model, n_layer=config.model.n_layer,
                      seq_len=config.model.max_seq_len, micro_batch=config.micro_batch_size,
                      compile=config.compile, activation_checkpointing=config.activation_checkpointing,
                      matmul_flops=matmul, peak_flops=peak,
                      mfu=result["achieved_flops"] / peak)
        rows.append(result)
        print(f"{name:>10} {mode:>8}: d={result['d_model']:4d} L={result['n_layer']:2d} {result['params_M']:6.1f}M params  "
              f"{result['tokens_per_s']:10,.0f} tok/s  {result['achieved_flops'] / 1e9:8.1f} GFLOP/s  "
              f"matmul {matmul / 1e9:8.1f} GFLOP/s  MFU {result['mfu']:.1%}", flush=True)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "dtype": str(dtype), "torch": torch.__version__, "python": sys.version.split()[0],
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cfg.save_json(report, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
