"""Ranked answers as the reward model reads them: the formats people's rankings come in (rankings from
`chatforge label export`, chosen/rejected pairs, Anthropic-HH dialogues), and the one rule for what is read
for each answer (`reward_ids`: the prompt, the answer's tokens as sampled, and the <|end|> that closes it),
used in training, `reward eval`, `reward score` and PPO alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from chatforge.chat_format import Message, check_conversation, check_text, fit_prompt, prompt_messages, render
from chatforge.model import GPT
from chatforge.sources import parse_records
from chatforge.tokenizer import Tokenizer


@dataclass
class Comparison:
    """K answers to one prompt, ranked: `ranking` lists answer indices, best first. `answer_ids` and
    `finished` hold each answer's tokens as sampled and whether it ended (None: only the text is known)."""

    prompt: list[Message]
    answers: list[str]
    ranking: list[int]
    answer_ids: list[list[int]] | None = None
    finished: list[bool] | None = None


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_dialogue(text: str) -> list[Message]:
    """An Anthropic-HH dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("expected a dialogue of '\\n\\nHuman: ' and '\\n\\nAssistant: ' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _dialogue(value) -> list[Message]:
    if isinstance(value, str):
        return hh_dialogue(value)
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [Message(m.get("role"), m.get("content")) for m in value]
    raise ValueError("'chosen' and 'rejected' must be dialogue strings or lists of {role, content} messages")


def _answer(value, name: str) -> str:
    """An answer given as text, or as the conversational format's [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string (or one assistant message)")
    return value


def comparison_from_record(record: dict) -> Comparison:
    """A checked comparison from any of the accepted formats; ValueError names what is wrong."""
    if "completions" in record or "ranking" in record:
        prompt = prompt_messages(record.get("prompt"))
        answers, ranking = record.get("completions"), record.get("ranking")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError("'completions' must be a list of strings")
        if (not isinstance(ranking, list) or not all(type(r) is int for r in ranking)
                or sorted(ranking) != list(range(len(answers)))):
            raise ValueError(f"'ranking' must list every completion index 0..{len(answers) - 1} once, best first")
    elif "chosen" in record and "rejected" in record:
        if "prompt" in record:
            prompt = prompt_messages(record["prompt"])
            answers = [_answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")]
        else:  # whole dialogues that differ in their last answer (Anthropic HH)
            chosen, rejected = _dialogue(record["chosen"]), _dialogue(record["rejected"])
            for dialogue in (chosen, rejected):
                check_conversation(dialogue)
            if chosen[:-1] != rejected[:-1]:
                raise ValueError("'chosen' and 'rejected' differ before their last answer")
            prompt, answers = chosen[:-1], [chosen[-1].content, rejected[-1].content]
        ranking = [0, 1]
    else:
        raise ValueError("expected {prompt, completions, ranking}, {prompt, chosen, rejected} or {chosen, rejected}")
    if len(answers) < 2:
        raise ValueError("a comparison needs at least 2 answers")
    for i, answer in enumerate(answers):  # an empty answer may be ranked (last, usually): it is what models do
        check_text(answer, f"answer {i}")
    ids, finished = sampled_tokens(record, len(answers), "completion_ids", "finish_reasons")
    return Comparison(prompt, answers, list(ranking), ids, finished)


# --- what a reward model reads ----------------------------------------------------------------------------

def reward_ids(prompt_ids: Sequence[int], answer_ids: Sequence[int], finished: bool, end_id: int) -> list[int]:
    """The token ids a reward model reads, for every use of it (training, `reward eval`, `reward score`,
    the pipeline and PPO): the prompt as rendered for the assistant to answer, the answer's tokens as they
    were sampled (never re-encoded from its text, which can split into other tokens), and <|end|>, where the
    score is read. A finished answer already ends in the <|end|> it sampled (one stopped by another stop
    token gets one appended). An answer that did not finish (cut off at the length limit) gets one appended,
    so that every score is read at the position the head learned to score; PPO subtracts its explicit
    `unfinished_penalty` from such an answer's score besides. An answer said to be cut off that ends in
    <|end|> is a ValueError: its record is inconsistent."""
    ended = bool(answer_ids) and answer_ids[-1] == end_id
    if ended and not finished:
        raise ValueError("an answer ending in <|end|> is said to be cut off ('length')")
    return [*prompt_ids, *answer_ids] + ([] if ended else [end_id])


def sampled_tokens(record: dict, count: int, ids_field: str, reasons_field: str) -> tuple[list[list[int]] | None, list[bool] | None]:
    """(token ids as sampled, finished) of a record's `count` answers, from `ids_field` (lists of token ids)
    and `reasons_field` ("stop" or "length" each) as `chatforge sample` writes them; (None, None) when the
    record has only text. ValueError names what is wrong."""
    ids, reasons = record.get(ids_field), record.get(reasons_field)
    if reasons is not None and (not isinstance(reasons, list) or len(reasons) != count
                                or not all(r in ("stop", "length") for r in reasons)):
        raise ValueError(f"{reasons_field!r} must list 'stop' or 'length' for each of the {count} answers")
    if ids is None:
        return None, None if reasons is None else [r == "stop" for r in reasons]
    if (not isinstance(ids, list) or len(ids) != count
            or not all(isinstance(a, list) and all(type(t) is int and t >= 0 for t in a) for a in ids)):
        raise ValueError(f"{ids_field!r} must hold a list of token ids for each of the {count} answers")
    return ids, [True] * count if reasons is None else [r == "stop" for r in reasons]


def encode_answers(prompt: list[Message], answers: list[str], answer_ids: list[list[int]] | None,
                   finished: list[bool] | None, tokenizer: Tokenizer, made_with: str | None) -> list[list[int]]:
    """`reward_ids` of each answer to `prompt`: from its sampled token ids when there are some, else from
    its text, encoded once (a written answer counts as finished unless its finish reason says otherwise).
    `made_with` is the fingerprint of the tokenizer that sampled the ids (None: not recorded). Ids that do
    not decode to their answer's text are refused: the reward model would learn from other answers than
    the ones ranked."""
    end = tokenizer.end_id
    if answer_ids is not None:
        if made_with is not None and made_with != tokenizer.fingerprint:
            raise ValueError(f"its token ids were sampled with another tokenizer ({made_with}, this model's is "
                             f"{tokenizer.fingerprint}): drop 'completion_ids' to encode the text instead")
        for i, (text, ids) in enumerate(zip(answers, answer_ids)):
            if any(t >= tokenizer.vocab_size for t in ids):
                raise ValueError(f"answer {i}: a token id is outside the model's vocabulary ({tokenizer.vocab_size} tokens)")
            if tokenizer.decode(ids, skip_special=True).strip() != text.strip():
                raise ValueError(f"answer {i}: its completion_ids do not decode to its text")
    else:
        answer_ids = [tokenizer.encode(a) for a in answers]
    finished = finished or [True] * len(answers)
    prompt_ids = render(prompt, tokenizer, add_generation_prompt=True)
    return [reward_ids(prompt_ids, a, f, end) for a, f in zip(answer_ids, finished)]


def text_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """What a classifier reads: <|bos|> text <|eos|>, classified at the <|eos|>."""
    return [*tokenizer.encode_document(text), tokenizer.eos_id]


@dataclass
class RankedAnswers:
    """A tokenized comparison: one sequence per answer (the prompt's `prompt_tokens` tokens, then the
    answer), the ranking (indices, best first), and a key naming the prompt."""

    sequences: list[np.ndarray]
    ranking: list[int]
    where: str
    prompt_tokens: int = 0
    key: str = ""
    truncated: bool = False  # the prompt's oldest turns (or its question's start) dropped to fit the context

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def fit_answers(prompt: list[Message], encode: Callable[[list[Message]], list[list[int]]], tokenizer: Tokenizer,
                max_seq_len: int) -> tuple[list[Message], list[list[int]], bool]:
    """`encode(prompt)`, each answer's `reward_ids`, in `max_seq_len` tokens: the prompt is cut when the
    longest would not fit (`chat_format.fit_prompt`: the oldest turns first), never the answers. The prompt,
    the sequences, and whether it was cut; ValueError when the longest answer alone does not fit."""
    sequences = encode(prompt)
    longest = max(map(len, sequences))
    if longest <= max_seq_len:
        return prompt, sequences, False
    answer = longest - len(render(prompt, tokenizer, add_generation_prompt=True))
    prompt, _ = fit_prompt(prompt, tokenizer, max_seq_len - answer)
    sequences = encode(prompt)
    if max(map(len, sequences)) > max_seq_len:  # a template that renders turns differently once some are gone
        raise ValueError(f"{max(map(len, sequences))} tokens even cut, longer than the model's context ({max_seq_len})")
    return prompt, sequences, True


def load_groups(paths: list[str], tokenizer: Tokenizer, max_seq_len: int, skip_invalid: bool) -> tuple[list[RankedAnswers], int]:
    """Tokenized comparisons of `paths`, and how many invalid records were skipped. A comparison longer than
    the context has its prompt cut (`chat_format.fit_prompt`: the oldest turns first), never its answers;
    one whose longest answer alone is too long is invalid."""

    def parse(record: dict) -> tuple[Comparison, list[list[int]], bool]:
        comparison = comparison_from_record(record)

        def encode(prompt: list[Message]) -> list[list[int]]:
            return encode_answers(prompt, comparison.answers, comparison.answer_ids, comparison.finished, tokenizer,
                                  record.get("tokenizer"))

        comparison.prompt, sequences, truncated = fit_answers(comparison.prompt, encode, tokenizer, max_seq_len)
        return comparison, sequences, truncated

    items, skipped = parse_records(paths, parse, skip_invalid, "comparison")
    groups = [RankedAnswers([np.array(s, dtype=np.int64) for s in sequences], c.ranking, where,
                            prompt_tokens=len(render(c.prompt, tokenizer, add_generation_prompt=True)),
                            key=repr([(m.role, m.content) for m in c.prompt]), truncated=truncated)
              for where, (c, sequences, truncated) in items]
    return groups, skipped



def answers_to_score(record: dict, model: GPT, tokenizer: Tokenizer) -> list[list[int]]:
    """What `model` reads for each answer of a record to score: {prompt, completion} or {prompt,
    completions: [...]}, with the sampled token ids and finish reasons when the record has them
    (`completion_ids` and `finish_reasons`, or `completion_ids` and `finish_reason` for one completion).
    A reward model reads `reward_ids` (the prompt cut to fit the context if it must be, never the answer); a
    classifier (trained on plain text) the answer's text alone."""
    prompt = prompt_messages(record.get("prompt"))
    one = "completion" in record
    answers = [record["completion"]] if one else record.get("completions")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("expected 'completion' (a string) or 'completions' (a list of strings)")
    for i, answer in enumerate(answers):
        check_text(answer, f"answer {i}")
    if model.config.head == "classifier":
        return [text_ids(a, tokenizer) for a in answers]
    if one:  # one completion: its fields hold one value each
        fields = {key: [record[key]] for key in ("completion_ids", "finish_reason") if key in record}
        ids, finished = sampled_tokens(fields, 1, "completion_ids", "finish_reason")
    else:
        ids, finished = sampled_tokens(record, len(answers), "completion_ids", "finish_reasons")

    def encode(prompt: list[Message]) -> list[list[int]]:
        return encode_answers(prompt, answers, ids, finished, tokenizer, record.get("tokenizer"))

    return fit_answers(prompt, encode, tokenizer, model.config.max_seq_len)[1]
