"""Reward-model throughput: InstructGPT's K-wise batching against naive pairwise, side by side in one run.

    python bench/reward_throughput.py             # cpu preset model, K = 4 and 8
    python bench/reward_throughput.py --answer-tokens 8 20   # short answers, as the dictionary's

K-wise: the K answers of a prompt are one batch element, each forwarded once (with its prompt), and the
C(K,2) pair losses come from those K scores. Shared (chatforge): the same, with the prompt forwarded once
per group and the K answers after it in one row (`reward.pack_shared_prefix`). Naive: every pair is its
own example, both answers forwarded for it, so each answer goes through the model K-1 times. For each K
this times, on the same weights and the same synthetic comparisons (prompt 32 tokens, answers 16-48 tokens
unless told):
- training: forward, the loss over all pairs, backward and an AdamW step;
- scoring: the forward passes alone (inference);
and reports answers/s (distinct answers of the ranked prompts per second) and the ratio, as medians of
--repeats runs taken in turns. Writes bench/results/reward_throughput.json.

Targets: K-wise >= (K-1)/2 x faster than naive pairwise at K = 4 and K = 8; shared faster than K-wise by
about the tokens it saves (K·(prompt + answer) against prompt + K·answer).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatforge import config as cfg
from chatforge.model import GPT
from chatforge.pretrain import PretrainConfig
from chatforge.objectives import ranking_loss
from chatforge.comparisons import RankedAnswers
from chatforge.packing import pack_shared_prefix, packed_outputs
from chatforge.reward import last_token_outputs, right_pad
from timing import timed, write_report  # bench/timing.py


def synthetic_groups(count: int, k: int, vocab: int, answer_tokens: tuple[int, int], seed: int = 0) -> list[RankedAnswers]:
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(count):
        prompt = rng.integers(7, vocab, 32)
        answers = [np.concatenate([prompt, rng.integers(7, vocab, rng.integers(answer_tokens[0], answer_tokens[1] + 1))])
                   for _ in range(k)]
        groups.append(RankedAnswers(answers, list(rng.permutation(k)), "bench"))
    return groups


def kwise_loss(model: GPT, groups: list[RankedAnswers]) -> torch.Tensor:
    """chatforge's way: each answer forwarded once, every pair's loss from the K scores."""
    ids, lengths = right_pad([s for g in groups for s in g.sequences], pad_id=0)
    scores = last_token_outputs(model, ids, lengths).split([len(g.sequences) for g in groups])
    return torch.stack([ranking_loss(s, g.ranking) for s, g in zip(scores, groups)]).mean()


def shared_loss(model: GPT, groups: list[RankedAnswers]) -> torch.Tensor:
    """chatforge's way: K-wise, with each prompt forwarded once and its answers packed after it."""
    packed = pack_shared_prefix([g.sequences for g in groups], pad_id=0)
    scores = packed_outputs(model, packed).split(packed.sizes)
    return torch.stack([ranking_loss(s, g.ranking) for s, g in zip(scores, groups)]).mean()


def pairwise_loss(model: GPT, groups: list[RankedAnswers]) -> torch.Tensor:
    """The naive way: every (winner, loser) pair forwarded as its own two sequences."""
    pairs = [(g.sequences[g.ranking[i]], g.sequences[g.ranking[j]])
             for g in groups for i, j in itertools.combinations(range(len(g.ranking)), 2)]
    ids, lengths = right_pad([s for pair in pairs for s in pair], pad_id=0)
    scores = last_token_outputs(model, ids, lengths).view(-1, 2)
    return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()


def train_step(model, optimizer, loss_fn, groups) -> None:
    loss = loss_fn(model, groups)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="model architecture from this preset (default: cpu)")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8], help="answers per prompt (default: 4 8)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (default: 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, taken in turns (median)")
    parser.add_argument("--answer-tokens", type=int, nargs=2, default=[16, 48], metavar=("MIN", "MAX"),
                        help="answer lengths, drawn uniformly (default: 16 48; the prompt has 32 tokens)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_throughput.json"))
    args = parser.parse_args(argv)

    config = cfg.from_dict(PretrainConfig, cfg.load_preset(args.preset, "pretrain")).model
    config.vocab_size, config.head = args.vocab_size, "scalar"
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    rows = []
    for k in args.ks:
        groups = synthetic_groups(args.prompts, k, args.vocab_size, tuple(args.answer_tokens))
        with torch.no_grad():  # the same loss every way: a check that the comparison is fair
            assert torch.allclose(kwise_loss(model, groups), pairwise_loss(model, groups), atol=1e-5)
            assert torch.allclose(kwise_loss(model, groups), shared_loss(model, groups), atol=1e-5)

        def score(loss_fn):
            with torch.inference_mode():
                loss_fn(model, groups)

        medians = timed({
            "kwise_train": lambda: train_step(model, optimizer, kwise_loss, groups),
            "pairwise_train": lambda: train_step(model, optimizer, pairwise_loss, groups),
            "shared_train": lambda: train_step(model, optimizer, shared_loss, groups),
            "kwise_score": lambda: score(kwise_loss),
            "pairwise_score": lambda: score(pairwise_loss),
            "shared_score": lambda: score(shared_loss),
        }, args.repeats)
        answers = args.prompts * k
        row = {"k": k, "prompts": args.prompts, "pairs": args.prompts * k * (k - 1) // 2, "target": (k - 1) / 2}
        for what in ("train", "score"):
            row[f"kwise_{what}_answers_s"] = answers / medians[f"kwise_{what}"]
            row[f"pairwise_{what}_answers_s"] = answers / medians[f"pairwise_{what}"]
            row[f"shared_{what}_answers_s"] = answers / medians[f"shared_{what}"]
            row[f"{what}_speedup"] = medians[f"pairwise_{what}"] / medians[f"kwise_{what}"]
            row[f"shared_{what}_speedup"] = medians[f"kwise_{what}"] / medians[f"shared_{what}"]
        lengths = [len(s) for g in groups for s in g.sequences]
        row["token_ratio"] = sum(lengths) / (len(groups) * 32 + sum(n - 32 for n in lengths))
        rows.append(row)
        for what in ("train", "score"):
            print(f"K={k} {what}: shared {row[f'shared_{what}_answers_s']:7.1f}, K-wise {row[f'kwise_{what}_answers_s']:7.1f}, "
                  f"pairwise {row[f'pairwise_{what}_answers_s']:6.1f} answers/s; K-wise/pairwise x{row[f'{what}_speedup']:.2f} "
                  f"(target x{row['target']:.1f}), shared/K-wise x{row[f'shared_{what}_speedup']:.2f} "
                  f"(tokens x{row['token_ratio']:.2f})", flush=True)
    write_report(args.out, rows, preset=args.preset, params_M=model.num_params() / 1e6,
                 answer_tokens=args.answer_tokens)


if __name__ == "__main__":
    main()
