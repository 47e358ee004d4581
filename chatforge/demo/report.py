"""The report card of a `chatforge run`: report.md and report.html from the stages' measurements.

One list of blocks (headings, paragraphs, tables, pictures, conversations) is written twice, as Markdown
and as a self-contained HTML page (its pictures are the run's PNG files, by relative path).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from chatforge.files import atomic_write

Block = tuple  # ("h1" | "h2" | "p", text) | ("table", header, rows) | ("img", path, caption) | ("pre", text)

MODEL_NAMES = {"pretrain": "pretrained", "base": "base", "sft": "SFT", "ppo": "PPO-ptx"}


def _number(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report_blocks(run: Path, settings: dict, results: dict) -> list[Block]:
    base = settings["run"].get("base")
    story = (f"fine-tuned from the pretrained model `{base}` on WordNet 3.0 and chatterbot-corpus (PPO's ptx term on "
             "the training words' WordNet entries and the Python 3.11 documentation); evaluated on words never in a "
             "conversation nor in that text" if base else
             "built from scratch on WordNet 3.0, the Python 3.11 documentation and chatterbot-corpus; evaluated on "
             "words whose WordNet entries were in the pretraining text but never in a conversation")
    blocks: list[Block] = [("h1", f"chatforge report card: {run.name}"),
                           ("p", f"Preset `{settings['preset']}`. A dictionary assistant the InstructGPT way, {story}.")]
    evaluation = results.get("evaluate")
    if evaluation:
        models = evaluation["models"]
        blocks += [("h2", f"Evaluation on {evaluation['words']} held-out words"),
                   ("table", ["metric", *(MODEL_NAMES[m] for m in models)], [
                       [label, *(_number(models[m].get(key, "-")) for m in models)] for key, label in (
                           ("definition_f1", "definition accuracy (F1 of content words with WordNet's best sense, greedy)"),
                           ("degenerate_rate", "degenerate answers (another word defined, or no content word)"),
                           ("repeated_rate", "stock answers (a definition also given for another word)"),
                           ("pos_accuracy", "part of speech exact match"),
                           ("reward", "reward-model score"),
                           ("zero_shot_mc", "\"Which definition fits X? A-D\", zero-shot (chance 0.25)"),
                           ("few_shot_mc", "\"Which definition fits X? A-D\", few-shot"),
                           ("zero_shot_cloze", "the same 4 definitions completing \"X (pos):\", zero-shot"),
                           ("few_shot_cloze", "the same, few-shot"),
                           ("bits_per_byte", "validation bits per byte"))]),
                   ("table", ["PPO-ptx against SFT", "value"], [
                       ["win rate under the reward model", _number(evaluation["ppo_vs_sft"]["win_rate_reward"])],
                       ["win rate under the ground truth (definition F1)", _number(evaluation["ppo_vs_sft"]["win_rate_f1"])],
                       ["KL(PPO ‖ SFT), nats per sampled answer", _number(evaluation["ppo_vs_sft"]["kl_per_answer"])]])]
    stage_rows = []
    for name, result in results.items():
        speed = result.get("tokens_per_s") or result.get("samples_per_s")
        unit = "tokens/s" if "tokens_per_s" in result else "samples/s" if "samples_per_s" in result else ""
        peak = result.get("peak_resident_bytes")
        stage_rows.append([name, f"{result['seconds']:.0f} s", f"{speed:,.0f} {unit}" if speed else "",
                           f"{peak / 2**30:.2f} GiB" if peak else "", _stage_summary(name, result)])
    blocks += [("h2", "Stages"), ("p", "Peak memory: the most the process held resident during the stage (weights, "
                                       "optimizer state, activations, the Python runtime)."),
               ("table", ["stage", "time", "speed", "peak memory", "result"], stage_rows)]
    for picture, caption in (("pretrain/curves.png", "pretraining loss and speed"), ("sft/curves.png", "SFT loss"),
                             ("reward/curves.png", "reward model: loss and held-out pairwise accuracy"),
                             ("reward/calibration.png", "reward model calibration on held-out words"),
                             ("ppo/ppo.png", "PPO-ptx: reward, KL, entropy, clipping, value model, answer length")):
        if (run / picture).is_file():
            blocks.append(("img", picture, caption))
    if evaluation and evaluation.get("samples"):
        blocks.append(("h2", "The same questions to each model (greedy)"))
        for sample in evaluation["samples"]:
            lines = [f"Q: {sample['question']}", f"WordNet: {sample['wordnet']}"]
            lines += [f"{MODEL_NAMES[m]}: {sample[m]}" for m in MODEL_NAMES if m in sample]
            blocks.append(("pre", "\n".join(lines)))
    blocks += [("h2", "Settings"), ("pre", json.dumps(settings, indent=2))]
    return blocks


def _stage_summary(name: str, result: dict) -> str:
    if name == "base":
        return f"{result['source']}: {result['params'] / 1e6:.1f}M parameters, context {result['context']:,}"
    if name == "corpus":
        return f"{result['documents']:,} documents, {result['tokens'].get('train', 0):,} training tokens"
    if name in ("pretrain", "sft"):
        return f"{result['steps']} steps, validation loss {result.get('val_loss', float('nan')):.3f}"
    if name == "reward":
        probe = result.get("part_of_speech_probe", {})
        pos = (f", the word's part of speech scored first for {probe['right_first']:.0%} of {probe['answers']} answers "
               "(chance 25%)") if probe.get("answers") else ""
        seen = f" (on as many of its training prompts {result['train_accuracy']:.1%})" if "train_accuracy" in result else ""
        pairs = result.get("definition_pairs", {})
        meaning = (f", on the {pairs['pairs']} held-out pairs that only the definition decides {pairs['accuracy']:.1%}"
                   if pairs.get("pairs") else "")
        return (f"held-out pairwise accuracy {result['accuracy']:.1%}{seen}{meaning}, calibration error "
                f"{result['calibration_error']:.3f}, reward-length correlation {result['length_correlation']:+.2f}{pos}")
    if name == "ppo":
        alarms = f", {len(result['alarms'])} alarm(s)" if result["alarms"] else ", no alarms"
        return (f"{result['iterations']} iterations, reward {result['reward_first']:+.2f} -> {result['reward_last']:+.2f}, "
                f"KL {result['kl_per_answer']:.2f} nats/answer (bound {result['kl_bound']:g}){alarms}")
    if name == "evaluate":
        return f"{result['words']} held-out words"
    return ""


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(("#" if kind == "h1" else "##") + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                  *("| " + " | ".join(r) + " |" for r in rows)]))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "pre":
            out.append("```\n" + block[1] + "\n```")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(block[1]).replace('`', '')}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555}"
             "pre{background:#f6f6f6;padding:.8em;white-space:pre-wrap}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{style}</style></head>"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")


def write_report(run: Path, settings: dict, results: dict) -> Path:
    """report.md and report.html in the run folder (written atomically); returns report.md's path."""
    blocks = report_blocks(run, settings, results)
    atomic_write(run / "report.md", to_markdown(blocks))
    atomic_write(run / "report.html", to_html(blocks, f"chatforge: {run.name}"))
    return run / "report.md"
