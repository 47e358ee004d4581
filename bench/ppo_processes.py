"""PPO under torchrun: samples/s of `chatforge ppo` on 2 processes (with and without --fsdp) against 1,
side by side in one run.

    python bench/ppo_processes.py                       # cpu preset's model size, 2 rounds
    python bench/ppo_processes.py --preset tiny --iterations 6 --rounds 3

Both runs get the same random checkpoints (a policy and a reward model of the preset's architecture, from
`ppo_throughput.py`), the same prompts, the same global batch, answer length, minibatch size and epochs,
and the same cores: 1 process with all `--threads`, or 2 processes with half each (gloo on CPU). Each
process of the 2-process run samples and scores half of every rollout and computes half of every
minibatch; their gradients are summed once per update. With --fsdp the policy and the value model are
sharded: each iteration gathers whole copies to sample and score, and every forward pass of the updates
gathers each block. The figures are the medians of the runs' own `samples_per_s` (the first iteration of
each run untimed), each round running 1 process, 2, then 2 with --fsdp.

On a 2-core machine this measures overhead, not scaling: 2 processes share the cores 1 process already
uses, so the ideal ratio is 1.0 and what falls short of it is the price of the collectives and of the
uneven answer lengths (the faster process waits for the slower at the gather). On N GPUs the ideal is N.
Writes bench/results/ppo_processes.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from chatforge.sources import nonempty_documents, write_sample_corpus
from chatforge.tokenizer import train_bpe
from chatforge.train import read_metrics
from ppo_throughput import SETTINGS, make_models, make_prompts  # bench/ppo_throughput.py
from timing import write_report  # bench/timing.py


def run_ppo(processes: int, threads: int, sft: Path, rm: Path, prompts: Path, setting: dict, args,
            out: Path, extra: tuple[str, ...] = ()) -> list[float]:
    """`chatforge ppo` on `processes` processes sharing `threads` threads; each timed iteration's samples/s."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "chatforge", "ppo", "--policy", sft, "--reward", rm, "--prompts", prompts,
               "--val-prompts", prompts, "--out", out, "--batch-size", setting["batch"],
               "--micro-batch-size", setting["minibatch"], "--max-new-tokens", setting["length"],
               "--rollout-batch-size", setting["batch"] // 2, "--ppo-epochs", args.epochs,
               "--max-steps", args.iterations, "--eval-every", 10_000, "--checkpoint-every", 10_000,
               "--lr", 1e-5, "--device", "cpu", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
    subprocess.run(list(map(str, command)), check=True, env=env, stdout=subprocess.DEVNULL)
    steps = [m for m in read_metrics(out) if "samples_per_s" in m]
    return [m["samples_per_s"] for m in steps[1:]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(SETTINGS), help="model and batch size (default: cpu)")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration (default: 4)")
    parser.add_argument("--iterations", type=int, default=4, help="iterations per run, the first one untimed (default: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 1 then 2 processes (default: 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads shared by the processes (default: all cores)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_processes.json"))
    args = parser.parse_args(argv)

    setting = SETTINGS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus, _ = write_sample_corpus(root / "corpus.jsonl", docstrings=False)
        tokenizer = train_bpe(nonempty_documents([corpus]), args.vocab_size)
        sft, rm = make_models(args.preset, tokenizer, root)
        prompts, _ = make_prompts(tokenizer, corpus, setting["batch"] * args.iterations, root)
        runs = {"1 process": (1, ()), "2 processes": (2, ()), "2 processes, --fsdp": (2, ("--fsdp",))}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            for k, (name, (processes, extra)) in enumerate(runs.items()):
                rates[name] += run_ppo(processes, args.threads, sft, rm, prompts, setting, args,
                                       root / f"ppo-{k}-{round_}", extra)
    one, two, sharded = (statistics.median(rates[name]) for name in runs)
    row = {"preset": args.preset, **setting, "epochs": args.epochs, "one_process_samples_per_s": one,
           "two_processes_samples_per_s": two, "ratio": two / one, "scaling_efficiency": two / one / 2,
           "two_processes_fsdp_samples_per_s": sharded, "fsdp_ratio": sharded / one}
    print(f"{args.preset}: {setting['batch']} answers x {setting['length']} tokens, {args.epochs} epochs, "
          f"{args.threads} threads in all\n"
          f"  1 process:           {one:.2f} samples/s\n"
          f"  2 processes:         {two:.2f} samples/s ({two / one:.2f}x; on {args.threads} shared cores the ideal "
          f"is 1x, on 2 devices 2x)\n"
          f"  2 processes, --fsdp: {sharded:.2f} samples/s ({sharded / one:.2f}x)")
    write_report(args.out, [row], threads_in_all=args.threads, iterations=args.iterations, rounds=args.rounds)


if __name__ == "__main__":
    main()
