"""`chatforge <command>`: the command line of every stage.

Errors caused by input (UserError) print one line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatforge import __version__
from chatforge.errors import UserError


def _tokenizer_train(args) -> None:
    from chatforge.data import nonempty_documents
    from chatforge.tokenizer import train_bpe

    tokenizer = train_bpe(nonempty_documents(args.inputs, args.field), args.vocab_size, args.min_frequency,
                          progress=args.progress and sys.stderr.isatty())
    tokenizer.save(args.out)
    print(f"tokenizer: {tokenizer.vocab_size} tokens -> {args.out}/tokenizer.json")


def _data_prepare(args) -> None:
    from chatforge.data import prepare

    result = prepare(args.inputs, args.tokenizer, args.out, field=args.field, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, workers=args.workers, seed=args.seed, progress=args.progress)
    for split, info in result.meta["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shard(s)")
    print(f"data -> {result.out}")


def _data_sample_corpus(args) -> None:
    from chatforge.data import write_sample_corpus

    path, count = write_sample_corpus(args.out, docstrings=args.docstrings)
    print(f"sample corpus: {count:,} documents of Python's documentation -> {path}")


def _command(config_class, run):
    """A command whose flags are `config_class`'s fields: `run(config)` does the work."""

    def command(args) -> None:
        from chatforge import config as cfg

        run(cfg.from_args(config_class, args, f"{args.command} config"))

    return command


def _training_stage(module: str, run: str):
    """The command of a training stage: its config (preset < flags, or a run's saved config with
    --resume), then `chatforge.<module>.<run>(config, resume_from=...)`."""

    def command(args) -> None:
        import importlib

        from chatforge import config as cfg

        stage = importlib.import_module(f"chatforge.{module}")
        config, checkpoint = stage.resolve_config(args.preset, cfg.overrides_from_args(args), args.resume)
        getattr(stage, run)(config, resume_from=checkpoint)

    return command


def _sample(args) -> None:
    from pathlib import Path

    from chatforge.checkpoint import load_model
    from chatforge.files import atomic_write_jsonl
    from chatforge.runtime import pick_device
    from chatforge.sample import read_prompts, sample_candidates

    params = _sampling_params(args)
    for t in args.temperatures or []:
        if not t >= 0:
            raise UserError(f"--temperatures must be >= 0, got {t}")
    if args.k < 2:
        raise UserError(f"-k must be at least 2 (answers to rank per prompt), got {args.k}")
    if params.num_beams > 1 and args.k > params.num_beams:
        raise UserError(f"-k is {args.k}, but --num-beams {params.num_beams} finds only {params.num_beams} answers per prompt")
    if params.num_beams > 1 and args.temperatures:
        raise UserError("--temperatures and --num-beams exclude each other: beam search does not sample")
    prompts = read_prompts(args.prompts)
    model, tokenizer, _ = load_model(args.checkpoint, pick_device(args.device))
    records = sample_candidates(model, tokenizer, prompts, args.k, params, args.temperatures, args.batch_size,
                                progress=args.progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(args.out, records)
    print(f"{len(records):,} prompts x {args.k} answers -> {args.out}")


def _sampling_params(args):
    from chatforge.engine import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              num_beams=args.num_beams, length_penalty=args.length_penalty)
    except ValueError as e:
        raise UserError(str(e)) from None


def _prompting_setup(args):
    """What `generate` and `chat` share: sampling settings, few-shot examples (checked before the model
    loads, so that bad input fails fast), the model and its tokenizer."""
    from chatforge.chat import load_few_shot
    from chatforge.checkpoint import load_model
    from chatforge.runtime import pick_device

    params = _sampling_params(args)
    examples = load_few_shot(args.few_shot) if args.few_shot else []
    model, tokenizer, _ = load_model(args.checkpoint, pick_device(args.device))
    return params, examples, model, tokenizer


def _generate(args) -> None:
    from chatforge.chat import completion_prompt
    from chatforge.engine import stream
    from chatforge.tokenizer import IncrementalDecoder

    params, examples, model, tokenizer = _prompting_setup(args)
    text = completion_prompt(args.prompt, examples, args.cot) if examples or args.cot else args.prompt
    print(text, end="", flush=True)
    decoder = IncrementalDecoder(tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode(text)]
    for token in stream(model, prompt, params, stop_ids=(tokenizer.bos_id, tokenizer.eos_id)):
        print(decoder.push(token), end="", flush=True)
    print()


def _chat(args) -> None:
    from chatforge.chat import ChatSession, run_terminal_chat

    params, examples, model, tokenizer = _prompting_setup(args)
    try:  # a system prompt or one-shot message with special tokens in it (the terminal chat reports its own)
        session = ChatSession(model, tokenizer, params, system=args.system, examples=examples, cot=args.cot)
        if args.prompt is not None:
            session.reply(args.prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.prompt is None:
        run_terminal_chat(session)


def _label_serve(args) -> None:
    from chatforge.label import serve

    serve(args.db, args.input, per_prompt=args.per_prompt, host=args.host, port=args.port)


def _label_add_annotator(args) -> None:
    from chatforge.label import add_annotator

    token = add_annotator(args.db, args.name)
    print(f"annotator {args.name.strip()!r} added; their token (shown only now, keep it secret):")
    print(token)


def _label_export(args) -> None:
    from chatforge.label import export_rankings

    count = export_rankings(args.db, args.out)
    print(f"{count} rankings -> {args.out}")


def _label_stats(args) -> None:
    from chatforge.label import database_stats, format_stats

    print(format_stats(database_stats(args.db, args.per_prompt)))


def _add_label_commands(commands) -> None:
    label = commands.add_parser("label", help="rank sampled answers in a web app (human feedback)",
                                description="Human feedback for the reward model: annotators rank each prompt's "
                                            "answers best to worst in a web page; rankings live in SQLite.")
    label_commands = label.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    db_help = "SQLite database of prompts, annotators and rankings"

    p = label_commands.add_parser(
        "serve", help="load candidates and serve the ranking page",
        description="Load candidates into the database (prompts already there are skipped), then serve the "
                    "ranking page at / and progress at /stats. Input: JSONL, one {\"prompt\": string or "
                    "[{role, content}, ...] ending with a user message, \"completions\": [2 or more strings], "
                    "\"sampling\": {...} (optional)} per line.")
    p.add_argument("--db", required=True, metavar="FILE", help=f"{db_help} (created if missing)")
    p.add_argument("--input", metavar="FILE",
                   help="candidates JSONL to load; may be left out when the database holds prompts")
    p.add_argument("--per-prompt", type=int, default=1, metavar="N",
                   help="how many different annotators rank each prompt (default: 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8001, help="port to listen on (default: 8001; 0: any free port)")
    p.set_defaults(func=_label_serve)

    p = label_commands.add_parser("add-annotator", help="create an annotator and print their token",
                                  description="Create an annotator with a new random token, printed once (the "
                                              "database keeps only its hash). The annotator signs in with it.")
    p.add_argument("--db", required=True, metavar="FILE", help=f"{db_help} (created if missing)")
    p.add_argument("name", metavar="NAME", help="the annotator's name, unique in the database")
    p.set_defaults(func=_label_add_annotator)

    p = label_commands.add_parser(
        "export", help="write the rankings as JSONL",
        description="Write one JSON line per submitted ranking: prompt, completions, ranking (completion "
                    "indices, best first), unacceptable (indices), ratings (per completion: helpful, honest, "
                    "harmless, 1-7), annotator, submitted_at. The file is replaced atomically.")
    p.add_argument("--db", required=True, metavar="FILE", help=db_help)
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    p.set_defaults(func=_label_export)

    p = label_commands.add_parser("stats", help="progress and inter-annotator agreement",
                                  description="Rankings per annotator, prompts with enough rankings, and how "
                                              "often annotators agree: pairwise agreement and Kendall's tau over "
                                              "prompts ranked by two or more (the numbers of the /stats page).")
    p.add_argument("--db", required=True, metavar="FILE", help=db_help)
    p.add_argument("--per-prompt", type=int, default=None, metavar="N",
                   help="rankings a prompt needs to count as complete (default: the last serve's --per-prompt)")
    p.set_defaults(func=_label_stats)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="SOURCE",
                        help=".txt/.md/.rst files, folders of them, .jsonl or .parquet files")
    parser.add_argument("--field", default="text", help="text field of .jsonl/.parquet records (default: text)")


def _plot(args) -> None:
    from pathlib import Path

    from chatforge.plots import CURVES_FILE, PPO_CURVES_FILE, plot_ppo_curves, plot_training_curves
    from chatforge.train import METRICS_FILE, read_metrics

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE}: not a run folder")
    metrics = read_metrics(run_dir)
    out = plot_training_curves(metrics, args.out or run_dir / CURVES_FILE, str(run_dir))
    print(f"curves -> {out}")
    if any("kl_per_answer" in m for m in metrics):
        print(f"PPO curves -> {plot_ppo_curves(metrics, out.with_name(PPO_CURVES_FILE), str(run_dir))}")


def _run(args) -> None:
    from chatforge import config as cfg
    from chatforge.demo.pipeline import RunConfig, run_pipeline

    base = cfg.load_preset(args.preset, "run")
    stages = {name: base.pop(name) for name in list(base) if isinstance(base[name], dict)}  # [run.<stage>] tables
    config = cfg.from_dict(RunConfig, cfg.merge(base, cfg.overrides_from_args(args)), "run config")
    run_pipeline(config, args.preset, stages)


def _serve(args) -> None:
    from chatforge import config as cfg
    from chatforge.serve import ServeConfig, serve

    overrides = cfg.overrides_from_args(args)
    if "api_key" not in overrides and os.environ.get("CHATFORGE_API_KEY"):  # keys kept out of `ps`
        overrides["api_key"] = [k.strip() for k in os.environ["CHATFORGE_API_KEY"].split(",") if k.strip()]
    serve(args.checkpoint, cfg.from_dict(ServeConfig, overrides, "serve config"))


def _add_prompting_arguments(p: argparse.ArgumentParser, max_new_tokens: int, prompting: bool = True) -> None:
    """Sampling options; with `prompting`, also few-shot examples and chain of thought."""
    if prompting:
        p.add_argument("--few-shot", metavar="FILE",
                       help="solved examples (JSONL in an SFT format) placed before the question: in-context learning")
        p.add_argument("--cot", action="store_true", help="chain of thought: add \"Let's think step by step.\"")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 is off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 is off (default: 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present by this; 1 is off (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--num-beams", type=int, default=1, metavar="N",
                   help="beam search with N beams: the most likely answer found instead of a sample, printed when "
                        "the search ends; the sampling options go unused (default: 1, off)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="L",
                   help="beam search ranks answers by total log-prob / length^L: 0 ranks by total log-prob, larger "
                        "L favours longer answers (default: 1.0)")
    _add_device_argument(p)


def _add_stage_arguments(parser: argparse.ArgumentParser, config_class, stage: str) -> None:
    from chatforge import config as cfg

    parser.add_argument("--preset", help=f"preset name ({', '.join(cfg.preset_names())}) or a TOML file; "
                                         f"its [{stage}] table is used")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    cfg.add_config_arguments(parser, config_class)


def build_parser() -> argparse.ArgumentParser:
    from chatforge import config as cfg
    from chatforge.classify import ClassifyConfig, ClassifyEvalConfig, eval_classifier
    from chatforge.demo.pipeline import RunConfig
    from chatforge.ppo import PPOConfig, PPOEvalConfig, eval_ppo
    from chatforge.pretrain import PretrainConfig
    from chatforge.reward import RewardConfig, RewardEvalConfig, RewardScoreConfig, eval_reward_model, score_answers
    from chatforge.serve import ServeConfig
    from chatforge.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="chatforge", description="Build a ChatGPT-style assistant end to end: "
                                     "pretrain -> SFT -> reward model -> PPO-ptx -> chat.")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_commands = tok.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = tok_commands.add_parser("train", help="train on text sources, save tokenizer.json",
                                description="Train a byte-level BPE (HF tokenizers) with chatforge's special tokens.")
    _add_source_arguments(p)
    p.add_argument("--out", required=True, help="folder to write tokenizer.json and tokenizer_config.json to")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary, special tokens included (default: 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge it (default: 2)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show the trainer's progress bars on a terminal")
    p.set_defaults(func=_tokenizer_train)

    data = commands.add_parser("data", help="prepare token shards from text")
    data_commands = data.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = data_commands.add_parser("prepare", help="tokenize a corpus into train/val shards",
                                 description="Tokenize text sources into .npy token shards with a train/val split.")
    _add_source_arguments(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    p.add_argument("--out", required=True, help="data folder to write (replaced atomically when complete)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation (default: 0.01)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: 100M)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core, at most 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(func=_data_prepare)
    p = data_commands.add_parser(
        "sample-corpus", help="write a zero-install corpus: Python's documentation, as JSONL",
        description="Write the documentation topics that ship with CPython (pydoc_data.topics) and the "
                    "standard library's docstrings as JSONL records with a 'text' field.")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--docstrings", action=argparse.BooleanOptionalAction, default=True,
                   help="include the standard library's docstrings (default: yes; --no-docstrings: topics only)")
    p.set_defaults(func=_data_sample_corpus)

    p = commands.add_parser(
        "pretrain", help="pretrain a GPT on prepared data",
        description="Pretrain a GPT (next-token prediction). Options override the preset; with --resume, "
                    "they override the run's saved config. Works under `torchrun --nproc_per_node N`.",
    )
    _add_stage_arguments(p, PretrainConfig, "pretrain")
    p.set_defaults(func=_training_stage("pretrain", "pretrain"))

    p = commands.add_parser(
        "sft", help="fine-tune a pretrained model on conversations",
        description="Supervised fine-tuning: the loss is on the assistant's tokens only. Reads JSONL/Parquet "
                    "records as {messages: [{role, content}]}, {prompt, completion} or ShareGPT "
                    "{conversations: [{from, value}]}. Works under `torchrun --nproc_per_node N`.",
    )
    _add_stage_arguments(p, SFTConfig, "sft")
    p.set_defaults(func=_training_stage("sft", "sft"))

    reward = commands.add_parser("reward", help="train, evaluate and use a reward model")
    reward_commands = reward.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = reward_commands.add_parser(
        "train", help="train a reward model on ranked answers",
        description="InstructGPT's reward model: the SFT model with a scalar head, trained on every pair of "
                    "each ranking (-1/C(K,2) · E[log σ(r_w − r_l)]), all K answers of a prompt in one batch. "
                    "Reads JSONL/Parquet rankings {prompt, completions, ranking} (from `chatforge label export`), "
                    "pairs {prompt, chosen, rejected}, or Anthropic-HH {chosen, rejected} dialogues. "
                    "Works under `torchrun --nproc_per_node N`.")
    _add_stage_arguments(p, RewardConfig, "reward")
    p.set_defaults(func=_training_stage("reward", "train_reward_model"))
    p = reward_commands.add_parser(
        "eval", help="accuracy, calibration and length bias on held-out rankings",
        description="Pairwise accuracy on held-out rankings, calibration (predicted P(win) = σ(r₁ − r₂) against "
                    "observed, as a plot), and the correlation of reward with answer length (a reward that "
                    "follows length can be gamed by PPO).")
    cfg.add_config_arguments(p, RewardEvalConfig)
    p.set_defaults(func=_command(RewardEvalConfig, eval_reward_model))
    p = reward_commands.add_parser(
        "score", help="score answers to prompts",
        description="Add the reward to each record of a JSONL file: {prompt, completion} gets 'reward', "
                    "{prompt, completions: [...]} gets 'rewards'. Prompts are strings or message lists. Answers "
                    "are read from their sampled tokens where the record has them (`chatforge sample`'s "
                    "completion_ids and finish_reasons), from their text otherwise. "
                    "The model is a reward model, or a classifier whose class --label gives the reward.")
    cfg.add_config_arguments(p, RewardScoreConfig)
    p.set_defaults(func=_command(RewardScoreConfig, score_answers))

    p = commands.add_parser(
        "ppo", help="RLHF: PPO-ptx against a reward model (`ppo eval`: compare with SFT)",
        description="InstructGPT's RL step: the SFT policy samples answers to --prompts, the reward model scores "
                    "them, and PPO maximises E[r(x,y) − β·log(π/π_SFT)] + γ_ptx·E_pretrain[log π(x)] with a value "
                    "model, GAE advantages, ratio clipping and an entropy bonus. Metrics every iteration, "
                    "curves in RUN/ppo.png, alarms on KL, non-finite values and collapse. "
                    "`chatforge ppo eval --help` compares the result with the SFT model.")
    _add_stage_arguments(p, PPOConfig, "ppo")
    p.set_defaults(func=_training_stage("ppo", "train_ppo"))
    ppo_commands = p.add_subparsers(dest="subcommand", required=False, metavar="[eval]")
    p = ppo_commands.add_parser(
        "eval", help="compare a PPO policy with the SFT policy on held-out prompts",
        description="Both policies answer each held-out prompt (the same seed); the reward model scores every "
                    "answer. Reports mean reward, the win rate of PPO over SFT under the reward model, "
                    "KL(PPO || SFT) per answer and answer length; writes ppo_eval.json and answers.jsonl.")
    cfg.add_config_arguments(p, PPOEvalConfig)
    p.set_defaults(func=_command(PPOEvalConfig, eval_ppo))

    classify = commands.add_parser("classify", help="fine-tune and evaluate a text classifier")
    classify_commands = classify.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = classify_commands.add_parser(
        "train", help="fine-tune a model with a classification head",
        description="Fine-tune a pretrained or SFT model with a classification head on labelled text "
                    "({text, label} JSONL/Parquet), reporting accuracy and per-class precision, recall and F1 "
                    "on held-out data. The classifier can then be a reward: `reward score --label CLASS`.")
    _add_stage_arguments(p, ClassifyConfig, "classify")
    p.set_defaults(func=_training_stage("classify", "train_classifier"))
    p = classify_commands.add_parser("eval", help="accuracy, precision, recall and F1 on labelled text",
                                     description="Evaluate a classifier on labelled text: per-class precision, "
                                                 "recall, F1 and support, accuracy, macro F1, confusion matrix.")
    cfg.add_config_arguments(p, ClassifyEvalConfig)
    p.set_defaults(func=_command(ClassifyEvalConfig, eval_classifier))

    p = commands.add_parser(
        "sample", help="sample K answers per prompt, to be ranked",
        description="The SFT model answers each prompt K times (the K samples share one prefill; with "
                    "--num-beams N >= K, the K best beams), for people to rank (`chatforge label serve`) or a rule. Writes JSONL {prompt, completions, completion_ids, "
                    "finish_reasons, tokenizer, sampling}: the reward model reads each answer's tokens as sampled.")
    p.add_argument("checkpoint", help="SFT checkpoint, or its run folder")
    p.add_argument("--prompts", required=True,
                   help=".txt (one user message per line) or .jsonl/.parquet with 'prompt' (a string or messages)")
    p.add_argument("-k", type=int, default=4, help="answers per prompt (InstructGPT: 4 to 9; default: 4)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--temperatures", type=float, nargs="+",
                   help="cycle the samples of each prompt through these temperatures (default: --temperature)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    _add_prompting_arguments(p, max_new_tokens=128, prompting=False)
    p.set_defaults(func=_sample)

    p = commands.add_parser("generate", help="continue a prompt with a trained model",
                            description="Sample a continuation of --prompt, streaming it, with the KV cache. "
                                        "With --few-shot or --cot the prompt becomes Q:/A: blocks.")
    p.add_argument("checkpoint", help="checkpoint folder, or run folder (its latest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of a document)")
    _add_prompting_arguments(p, max_new_tokens=128)
    p.set_defaults(func=_generate)

    p = commands.add_parser("chat", help="talk to a model in the terminal",
                            description="A multi-turn conversation with streamed answers. In the chat: /reset, "
                                        "/save FILE, /params k=v ..., /help, /quit.")
    p.add_argument("checkpoint", help="checkpoint folder, or run folder (its latest checkpoint)")
    p.add_argument("--system", default="", help="system prompt at the start of the conversation")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (for scripts)")
    _add_prompting_arguments(p, max_new_tokens=256)
    p.set_defaults(func=_chat)

    p = commands.add_parser(
        "run", help="the whole pipeline on WordNet, the Python docs and chatterbot, with a report card",
        description="corpus -> tokenizer -> pretrain -> SFT -> ranked answers (simulated annotator) -> reward "
                    "model -> PPO-ptx -> evaluation on held-out words -> RUN/report.md and report.html. "
                    "Stages already done are skipped; an interrupted one resumes from its checkpoint. Stage "
                    "settings come from the preset's tables, the pipeline's from its [run] table.")
    p.add_argument("--preset", default="cpu", help=f"preset name ({', '.join(cfg.preset_names())}) or a TOML file (default: cpu)")
    cfg.add_config_arguments(p, RunConfig)
    p.set_defaults(func=_run)

    p = commands.add_parser(
        "serve", help="an OpenAI-compatible API and a web chat page",
        description="Serve CHECKPOINT: POST /v1/chat/completions and /v1/completions (streaming with stream: true), "
                    "GET /v1/models, /health, /metrics (Prometheus) and /openapi.json, and the chat page at /. "
                    "Concurrent requests share the model by continuous batching. Keys may also come from the "
                    "CHATFORGE_API_KEY environment variable (comma-separated), which keeps them out of `ps`.")
    p.add_argument("checkpoint", help="checkpoint folder, or run folder (its latest checkpoint)")
    cfg.add_config_arguments(p, ServeConfig)
    p.set_defaults(func=_serve)

    p = commands.add_parser("plot", help="draw a run's training curves",
                            description="Plot loss, validation metrics, tokens/s and learning rate from a run's "
                                        "metrics.jsonl (training also redraws them at every evaluation).")
    p.add_argument("run_dir", help="run folder")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_plot)

    _add_label_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
