"""PPO's peak memory per iteration against the rollout's size, and its speed against another revision.

    python bench/ppo_memory.py                                    # this tree: batch 32 and 256
    git worktree add /tmp/base REVISION && python bench/ppo_memory.py --baseline /tmp/base   # e.g. before a change

One iteration of `chatforge ppo` (sample, score with the policy, the reference, the value model and the
reward model, then the epochs of minibatch updates) on the cpu preset's architecture with random weights,
so every answer runs to the length limit. Peak memory is the most tensor memory the iteration holds at
once beyond what was allocated before it (the profiler's allocation events on a CPU, the allocator's peak
counter on a GPU; `chatforge.runtime.peak_memory`). Samples/s is the median over timed iterations (the
first of each round is a warm-up). With --baseline, each round runs this tree and the other one in turn,
each in a fresh process that imports chatforge from its tree, so that both see the same machine drift.

Target: the peak at batch 256 within 1.5x of the one at batch 32 (the rollout's token ids and per-token
scalars are all that grow); samples/s within 5% of the baseline's. Writes bench/results/ppo_memory.json.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def worker(args) -> None:
    """In a process whose chatforge is the tree under test: time and measure, print one JSON line."""
    import torch

    from chatforge.sources import nonempty_documents
    from chatforge.ppo import PPOConfig, build_ppo
    from chatforge.tokenizer import train_bpe
    from chatforge.train import make_optimizer
    from ppo_throughput import make_models, make_prompts  # bench/ppo_throughput.py: the same models and prompts

    # this tree's measuring function, whatever the revision under test has
    spec = importlib.util.spec_from_file_location("measuring_runtime", TREE / "chatforge" / "runtime.py")
    measuring = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # registered: it holds dataclasses
    spec.loader.exec_module(measuring)

    scratch, root = Path(args.scratch), Path(tempfile.mkdtemp(dir=args.scratch))
    tokenizer = train_bpe(nonempty_documents([scratch / "corpus.jsonl"]), args.vocab_size)
    sft, rm = make_models("cpu", tokenizer, root)
    prompts, _ = make_prompts(tokenizer, scratch / "corpus.jsonl", max(args.batches) * (args.iterations + 2), root)
    device = torch.device(args.device)
    result = {}
    for batch in args.batches:
        config = PPOConfig(policy=str(sft), reward=str(rm), prompts=[str(prompts)], val_prompts=[str(prompts)],
                           out=str(root / f"ppo-{batch}"), batch_size=batch, micro_batch_size=8, max_new_tokens=48,
                           ppo_epochs=4, lr=1e-5, progress=False, device=args.device)
        model, _, task = build_ppo(config, device)
        optimizer = make_optimizer(model, config, device)
        step = iter(range(10**6))
        task.iteration(model, optimizer, next(step), config.lr)  # optimizer state and first-call costs
        _, peak = measuring.peak_memory(lambda: task.iteration(model, optimizer, next(step), config.lr), device)
        row = {"peak_bytes": peak}
        if batch == args.batches[0]:
            times = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                task.iteration(model, optimizer, next(step), config.lr)
                times.append(time.perf_counter() - t0)
            row["samples_per_s"] = batch / statistics.median(times)
        result[batch] = row
    print(json.dumps(result))


def prepare(scratch: Path) -> None:
    """The corpus (Python's docs) that every process reads."""
    sys.path.insert(0, str(TREE))
    from chatforge.sources import write_sample_corpus

    write_sample_corpus(scratch / "corpus.jsonl", docstrings=False)


def run_tree(tree: Path, scratch: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, __file__, "--worker", "--scratch", str(scratch), "--device", args.device,
               "--iterations", str(args.iterations), "--vocab-size", str(args.vocab_size),
               "--batches", *map(str, args.batches)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{tree}: the measuring process failed:\n{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a checkout of another revision to compare with (e.g. a git worktree)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="answers per iteration (default: 32 256)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations at the first batch size per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (this tree, then the baseline)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(HERE / "results" / "ppo_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    trees = {"this": TREE, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        prepare(scratch)
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(run_tree(tree, scratch, args))
                print(f"round {round_ + 1}, {name}: {runs[name][-1]}", flush=True)
    first, last = args.batches[0], args.batches[-1]
    rows = []
    for name, results in runs.items():
        row = {"tree": str(trees[name]), "samples_per_s": statistics.median(r[first]["samples_per_s"] for r in results),
               **{f"peak_mib_{b}": statistics.median(r[b]["peak_bytes"] for r in results) / 2**20 for b in args.batches}}
        row["peak_ratio"] = row[f"peak_mib_{last}"] / row[f"peak_mib_{first}"]
        rows.append(row)
        print(f"{name}: {row['samples_per_s']:.2f} samples/s at batch {first}; peak memory "
              + ", ".join(f"{row[f'peak_mib_{b}']:.0f} MiB at batch {b}" for b in args.batches)
              + f" ({row['peak_ratio']:.2f}x; target <= 1.5x)")
    if args.baseline:
        ratio = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
        print(f"this tree / baseline: {ratio:.3f}x samples/s (target >= 0.95)")
    sys.path.insert(0, str(HERE))
    from timing import write_report

    write_report(args.out, rows, batches=args.batches, iterations=args.iterations, rounds=args.rounds, device=args.device)


if __name__ == "__main__":
    main()
