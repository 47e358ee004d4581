"""How far can a run's reward model take its SFT model? Best-of-n on the held-out words.

`python -m chatforge.demo.best_of_n RUN` samples n answers from RUN's SFT model to each held-out question
and keeps, of the first m (m = 1, 2, 4, ..., n), the one the reward model scores highest; then the one
the simulated annotator's own rule scores highest (the oracle: a perfect reward model). Each pick is scored
by the ground truth (definition F1 on content words) against SFT's greedy answer, as the report card
scores PPO. Best-of-m stays within KL(π ‖ π_SFT) <= log m − (m − 1)/m of the SFT model (Stiennon et al.
2020) and is the usual yardstick of what optimising a reward model at a given KL buys (Gao et al. 2023,
"Scaling laws for reward model overoptimization"): when the reward model's pick does not beat SFT at the
KL that PPO is allowed, the reward model does not know what the ground truth asks for, and PPO cannot
learn it from it. The within-word rank correlation of each scorer with F1 says the same in one number.
Writes RUN/best-of-n.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chatforge import config as cfg
from chatforge.errors import UserError


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's correlation of two score lists: Pearson's of their ranks, tied values sharing the mean of
    their ranks (most answers of a word score F1 0: ties broken by order would invent an order); nan when
    one side is constant."""
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of `x`, each group of equal values given the mean of the ranks it spans."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse]


def best_of(scores: np.ndarray, values: np.ndarray, m: int, rng: np.random.Generator, repeats: int) -> np.ndarray:
    """(repeats, words) `values` of the answer `scores` ranks first among m of each word's n answers drawn
    at random, `repeats` times (once when m = n, where every draw is the same)."""
    words, n = scores.shape
    picks = []
    for _ in range(1 if m == n else repeats):
        drawn = np.stack([rng.choice(n, m, replace=False) for _ in range(words)])
        best = drawn[np.arange(words), scores[np.arange(words)[:, None], drawn].argmax(1)]
        picks.append(values[np.arange(words), best])
    return np.array(picks)


def best_of_n(run: Path, n: int, temperature: float, repeats: int = 20) -> dict:
    from chatforge.chat_format import Message
    from chatforge.demo.dictionary import DEFINE, annotator_score, definition_f1, is_degenerate
    from chatforge.demo.pipeline import RunConfig, run_context
    from chatforge.engine import SamplingParams
    from chatforge.evaluate import question_ids
    from chatforge.rollout import model_reward
    from chatforge.sample import sample_candidates

    settings = json.loads((run / "run.json").read_text())
    config = cfg.from_dict(RunConfig, {**settings["run"], "out": str(run)}, f"{run / 'run.json'}")
    ctx = run_context(config, settings["preset"], settings.get("stages", {}))
    words = ctx.held_out_words[: config.eval_words]
    greedy = [json.loads(line)["sft"] for line in (run / "evaluate" / "answers.jsonl").read_text().splitlines()]
    if len(greedy) != len(words):
        raise UserError(f"{run / 'evaluate' / 'answers.jsonl'}: {len(greedy)} answers for {len(words)} held-out words")
    model, tokenizer = ctx.load(run / "sft")
    prompts = [(w.word, [Message("user", w.question(DEFINE))]) for w in words]
    params = SamplingParams(max_new_tokens=config.answer_tokens, temperature=temperature, seed=config.seed + 7)
    samples = sample_candidates(model, tokenizer, prompts, n, params, batch_size=config.sample_batch,
                                progress=config.progress)
    del model
    reward_model, _ = ctx.load(run / "reward")
    reward = model_reward(reward_model, tokenizer.end_id, tokenizer.pad_id)
    rewards = np.stack([reward([question_ids(w.question(DEFINE), tokenizer)] * n, s["completion_ids"],
                               [f == "stop" for f in s["finish_reasons"]]).numpy() for s, w in zip(samples, words)])
    f1 = np.array([[definition_f1(a, w) for a in s["completions"]] for s, w in zip(samples, words)])
    annotator = np.array([[annotator_score(a, w) for a in s["completions"]] for s, w in zip(samples, words)])
    degenerate = np.array([[is_degenerate(a, w) for a in s["completions"]] for s, w in zip(samples, words)], dtype=float)
    greedy_f1 = np.array([definition_f1(a, w) for a, w in zip(greedy, words)])

    rng = np.random.default_rng(config.seed)
    rows = []
    for m in [m for m in (1, 2, 4, 8, 16, 32, 64) if m < n] + [n]:
        row = {"m": m, "kl_bound": float(np.log(m) - (m - 1) / m)}
        state = rng.bit_generator.state
        for picker, scores in (("reward_model", rewards), ("annotator", annotator)):
            rng.bit_generator.state = state  # both pickers, and both values, from the same draws
            picked_f1 = best_of(scores, f1, m, rng, repeats)
            rng.bit_generator.state = state
            picked_degenerate = best_of(scores, degenerate, m, rng, repeats)
            wins = (picked_f1 > greedy_f1) + 0.5 * (picked_f1 == greedy_f1)
            row[picker] = {"f1": float(picked_f1.mean()), "win_rate_over_sft_greedy": float(wins.mean()),
                           "degenerate_rate": float(picked_degenerate.mean())}
        rows.append(row)
    correlation = lambda scores: float(np.nanmean([rank_correlation(s, f) for s, f in zip(scores, f1)]))  # noqa: E731
    return {"n": n, "temperature": temperature, "words": len(words), "sft_greedy_f1": float(greedy_f1.mean()),
            "sft_greedy_f1_zero": float((greedy_f1 == 0).mean()), "sample_f1": float(f1.mean()),
            "rank_correlation_with_f1": {"reward_model": correlation(rewards), "annotator": correlation(annotator)},
            "best_of": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chatforge.demo.best_of_n", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `chatforge run` folder (its evaluate stage done)")
    parser.add_argument("--n", type=int, default=16, help="answers sampled per held-out question (default: 16)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="random draws of m of the n answers averaged for each m < n (default: 20)")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2, got {args.n}")
    try:
        result = best_of_n(args.run, args.n, args.temperature, args.repeats)
    except UserError as e:  # one line, as the chatforge command gives it
        raise SystemExit(f"chatforge: error: {e}") from None
    cfg.save_json(result, args.run / "best-of-n.json")
    print(f"{result['words']} held-out words, {args.n} answers each at temperature {args.temperature}: "
          f"SFT greedy F1 {result['sft_greedy_f1']:.3f} ({result['sft_greedy_f1_zero']:.0%} of its answers at 0), "
          f"a sampled answer's F1 {result['sample_f1']:.3f}")
    print("within-word rank correlation with F1: " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["rank_correlation_with_f1"].items()))
    print(f"{'m':>3} {'KL <=':>6}  {'reward model: F1, win, degenerate':>34}  {'annotator (oracle): F1, win, degenerate':>40}")
    for row in result["best_of"]:
        cells = [f"{row[p]['f1']:.3f}  {row[p]['win_rate_over_sft_greedy']:.3f}  {row[p]['degenerate_rate']:.3f}"
                 for p in ("reward_model", "annotator")]
        print(f"{row['m']:>3} {row['kl_bound']:>6.2f}  {cells[0]:>34}  {cells[1]:>40}")
    print(f"-> {args.run / 'best-of-n.json'}")


if __name__ == "__main__":
    main()
