"""PPO throughput: chatforge's PPO iteration against TRL's PPOTrainer, side by side in one run.

    python bench/ppo_throughput.py                 # tiny and cpu presets
    python bench/ppo_throughput.py --presets cpu --iterations 4 --rounds 3

One PPO iteration = sample a batch of answers, score them (log-probs under the policy and the reference,
values, the reward model), then several epochs of minibatch updates of the policy and the value model.
Both frameworks get the same models (one chatforge checkpoint, which is also a Hugging Face Llama folder:
TRL loads it with `LlamaForCausalLM` / `LlamaForSequenceClassification`), the same prompts (the same token
ids), the same number of answers per iteration, answer length, minibatch size and epochs, the same stop
token (<|end|>), and the same threads. The weights are random, so answers run to the length limit in
both. TRL's iteration is timed between its `on_step_end` callbacks, its generation by wrapping its
`batch_generation`; chatforge reports its own split. Rounds alternate (chatforge, then TRL), and the
figures are medians over all timed iterations (the first iteration of each round is a warm-up).

Needs `trl` (benchmark only; `make bench` installs it). Writes bench/results/ppo_throughput.json.
Target: chatforge >= 3x TRL's samples/s on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chatforge import config as cfg
from chatforge.chat_format import Message, render
from chatforge.checkpoint import save_checkpoint
from chatforge.sources import nonempty_documents, write_sample_corpus
from chatforge.files import atomic_write
from chatforge.model import GPT, with_head
from chatforge.ppo import PPOConfig, build_ppo
from chatforge.pretrain import PretrainConfig
from chatforge.runtime import peak_flops
from chatforge.tokenizer import END_OF_TURN, Tokenizer, train_bpe
from chatforge.train import make_optimizer
from timing import write_report  # bench/timing.py

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SETTINGS = {  # preset -> answers per iteration, answer length, minibatch size (epochs: --epochs)
    "tiny": {"batch": 16, "length": 16, "minibatch": 8},
    "cpu": {"batch": 32, "length": 48, "minibatch": 8},
}


def make_models(preset: str, tokenizer: Tokenizer, root: Path) -> tuple[Path, Path]:
    """A random policy (the "SFT model") and a reward model of the preset's architecture, as checkpoints."""
    config = cfg.from_dict(PretrainConfig, cfg.load_preset(preset, "pretrain")).model
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    policy = GPT(config)
    reward = with_head(policy, "scalar")
    torch.nn.init.normal_(reward.score.weight, std=0.02)
    save_checkpoint(root / "sft", policy, tokenizer)
    save_checkpoint(root / "rm", reward, tokenizer)
    return root / "sft", root / "rm"


def make_prompts(tokenizer: Tokenizer, corpus: Path, count: int, root: Path) -> tuple[Path, list[list[int]]]:
    """`count` one-line prompts from the corpus of 12-24 words, as a file and as chatforge's token ids."""
    lines = []
    for doc in nonempty_documents([corpus]):
        for line in doc.splitlines():
            words = line.split()
            if 12 <= len(words) <= 24 and line.isascii():
                lines.append(" ".join(words))
        if len(lines) >= count:
            break
    atomic_write(root / "prompts.txt", "\n".join(lines[:count]) + "\n")
    return root / "prompts.txt", [render([Message("user", t)], tokenizer, add_generation_prompt=True) for t in lines[:count]]


class ChatforgePPO:
    def __init__(self, sft: Path, rm: Path, prompts: Path, setting: dict, epochs: int, out: Path, value_init: str):
        self.config = PPOConfig(policy=str(sft), reward=str(rm), prompts=[str(prompts)], val_prompts=[str(prompts)],
                                out=str(out), batch_size=setting["batch"], micro_batch_size=setting["minibatch"],
                                max_new_tokens=setting["length"], ppo_epochs=epochs, lr=1e-5, progress=False,
                                value_init=value_init)
        self.policy, _, self.task = build_ppo(self.config, torch.device("cpu"))
        self.optimizer = make_optimizer(self.policy, self.config, torch.device("cpu"))
        self.step = 0

    def iterations(self, count: int) -> list[dict]:
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            record = self.task.iteration(self.policy, self.optimizer, self.step, self.config.lr)
            self.step += 1
            out.append({"total": time.perf_counter() - t0, "generate": record["generate_s"],
                        "score": record["score_s"], "train": record["train_s"], "tokens": record["answer_length"],
                        "prompt_tokens": float(np.mean([len(p) for p in self.task.prompts(self.step - 1)]))})
        return out


def trl_iterations(sft: Path, rm: Path, prompt_ids: list[list[int]], setting: dict, epochs: int, count: int,
                   out: Path) -> list[dict]:
    """`count` iterations of TRL's PPOTrainer on the same checkpoints and prompts; per-iteration timings."""
    from datasets import Dataset
    from transformers import (
        AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification, PrinterCallback, TrainerCallback,
        logging as hf_logging,
    )
    from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    generation_times: list[float] = []
    original = ppo_trainer.batch_generation

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        generation_times.append(time.perf_counter() - t0)
        return result

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    config = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=setting["batch"], gradient_accumulation_steps=1,
        num_mini_batches=setting["batch"] // setting["minibatch"], num_ppo_epochs=epochs,
        response_length=setting["length"], local_rollout_forward_batch_size=setting["batch"],
        total_episodes=setting["batch"] * count, stop_token_id=end_id, temperature=1.0, kl_coef=0.02,
        learning_rate=1e-5, report_to=[], save_strategy="no", num_sample_generations=0, logging_steps=10**6,
        use_cpu=True, disable_tqdm=True, seed=0, bf16=False, dataloader_num_workers=0)
    dataset = Dataset.from_dict({"input_ids": prompt_ids})
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=LlamaForCausalLM.from_pretrained(sft),
        ref_model=LlamaForCausalLM.from_pretrained(sft), reward_model=LlamaForSequenceClassification.from_pretrained(rm),
        value_model=LlamaForSequenceClassification.from_pretrained(rm), train_dataset=dataset,
        eval_dataset=dataset, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step metrics print
    ppo_trainer.batch_generation = timed_generation
    try:
        trainer.train()
    finally:
        ppo_trainer.batch_generation = original
    totals = np.diff(step_ends)
    return [{"total": float(t), "generate": g, "score_and_train": float(t) - g} for t, g in zip(totals, generation_times)]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"], choices=sorted(SETTINGS))
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration (default: 4)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations per round, the first one untimed (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of chatforge then TRL (default: 3)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_throughput.json"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus, _ = write_sample_corpus(root / "corpus.jsonl", docstrings=False)
        tokenizer = train_bpe(nonempty_documents([corpus]), args.vocab_size)
        for preset in args.presets:
            setting = SETTINGS[preset]
            folder = root / preset
            sft, rm = make_models(preset, tokenizer, folder)
            prompts, prompt_ids = make_prompts(tokenizer, corpus, setting["batch"] * args.iterations, folder)
            runs: dict[str, list[dict]] = {"chatforge": [], "chatforge_reward_head": [], "trl": []}
            for round_ in range(args.rounds):
                for name, value_init in (("chatforge", "reward"), ("chatforge_reward_head", "reward-head")):
                    ppo = ChatforgePPO(sft, rm, prompts, setting, args.epochs, folder / f"{name}-{round_}", value_init)
                    runs[name] += ppo.iterations(args.iterations)[1:]
                runs["trl"] += trl_iterations(sft, rm, prompt_ids, setting, args.epochs, args.iterations,
                                              folder / f"trl-{round_}")[1:]
            policy = ppo.policy
            # training FLOPs of chatforge's iteration: every epoch, forward + backward (6 FLOPs per parameter
            # and token) of the policy and of the value model (a copy of the reward model: the same body)
            tokens = setting["batch"] * (median(runs["chatforge"], "prompt_tokens") + setting["length"])
            train_flops = args.epochs * 2 * policy.flops_per_token(round(tokens / setting["batch"])) * tokens
            peak = peak_flops(torch.device("cpu"), torch.float32)
            row = {"preset": preset, **setting, "epochs": args.epochs, "params": policy.num_params()}
            for name, rows_ in runs.items():
                row[name] = {"iteration_s": median(rows_, "total"), "generate_s": median(rows_, "generate")}
                if name == "trl":
                    row[name]["score_and_train_s"] = median(rows_, "score_and_train")
                else:
                    row[name].update(score_s=median(rows_, "score"), train_s=median(rows_, "train"),
                                     answer_tokens=median(rows_, "tokens"))
                row[name]["samples_per_s"] = setting["batch"] / row[name]["iteration_s"]
            row["chatforge"]["train_mfu"] = train_flops / row["chatforge"]["train_s"] / peak
            row["speedup"] = row["chatforge"]["samples_per_s"] / row["trl"]["samples_per_s"]
            row["speedup_reward_head"] = row["chatforge_reward_head"]["samples_per_s"] / row["trl"]["samples_per_s"]
            rows.append(row)
            c, h, t = row["chatforge"], row["chatforge_reward_head"], row["trl"]
            print(f"{preset}: {setting['batch']} answers x {setting['length']} tokens, {args.epochs} epochs, "
                  f"minibatch {setting['minibatch']}, {row['params'] / 1e6:.2f}M parameters\n"
                  f"  chatforge: {c['iteration_s']:.2f} s/iteration (generate {c['generate_s']:.2f}, score "
                  f"{c['score_s']:.2f}, train {c['train_s']:.2f} at {c['train_mfu']:.0%} MFU), "
                  f"{c['samples_per_s']:.1f} samples/s\n"
                  f"  TRL:       {t['iteration_s']:.2f} s/iteration (generate {t['generate_s']:.2f}, score + train "
                  f"{t['score_and_train_s']:.2f}), {t['samples_per_s']:.1f} samples/s\n"
                  f"  chatforge / TRL: {row['speedup']:.2f}x samples/s (target >= 3x)\n"
                  f"  chatforge, value head on the reward model's frozen body (--value-init reward-head): "
                  f"{h['iteration_s']:.2f} s/iteration (train {h['train_s']:.2f}), {row['speedup_reward_head']:.2f}x TRL")
    write_report(args.out, rows, epochs=args.epochs, iterations=args.iterations, rounds=args.rounds)


if __name__ == "__main__":
    main()
