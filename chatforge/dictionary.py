"""The demo's assistant is a dictionary: questions about words, answered from WordNet.

Words are split once, by a seeded hash, into training words (their conversations are in SFT, their prompts
in the preferences and in PPO) and held-out words (their WordNet entries are in the pretraining text, but
never in a conversation: the evaluation asks about them). Format words, beyond the demo's slice, are only
asked about in SFT: they teach the form of an answer on more words than a small model can learn by heart.
Three kinds of question:

    What does "X" mean?        ->  X (noun): <the first sense's definition>.
    Use "X" in a sentence.     ->  <WordNet's example sentence>
    Give a synonym for "X".    ->  <a synonym>

The ground truth is stated and deterministic (`definition_f1`, `part_of_speech`), and the simulated
annotator ranks answers by a rule anyone can read (`annotator_score`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from chatforge.corpora import Entry

DEFINE, USE, SYNONYM = "define", "use", "synonym"
QUESTIONS = {
    DEFINE: 'What does "{word}" mean?',
    USE: 'Use "{word}" in a sentence.',
    SYNONYM: 'Give a synonym for "{word}".',
}
PARTS_OF_SPEECH = ("noun", "verb", "adjective", "adverb")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Word:
    """A word of the demo, with its one part of speech and its first (most frequent) sense."""

    word: str
    pos: str
    definition: str
    examples: tuple[str, ...]
    synonyms: tuple[str, ...]

    @classmethod
    def from_entry(cls, entry: Entry) -> "Word":
        sense = entry.senses[0]
        return cls(entry.word, entry.pos, sense.definition, tuple(sense.examples), tuple(entry.synonyms()))

    def answer(self, kind: str) -> str | None:
        """The reference answer to a question of this kind (None when WordNet has nothing for it)."""
        if kind == DEFINE:
            return f"{self.word} ({self.pos}): {self.definition}."
        if kind == USE:
            return _sentence(self.examples[0]) if self.examples else None
        if kind == SYNONYM:
            return f"{self.synonyms[0]}." if self.synonyms else None
        raise ValueError(f"unknown question kind {kind!r}")

    def question(self, kind: str) -> str:
        return QUESTIONS[kind].format(word=self.word)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def demo_words(entries: list[Entry], count: int, max_definition_words: int = 16) -> list[Word]:
    """Up to `count` words for the demo, the most common first: single lower-case words with one part of
    speech in WordNet (so the part of speech of an answer is right or wrong), a first sense that people
    use (seen in the sense-tagged corpus) and a short definition."""
    pos_count = Counter(e.word for e in entries)
    fit = [e for e in entries
           if pos_count[e.word] == 1 and e.word.isalpha() and e.word.islower() and len(e.word) >= 3 and e.tagged > 0
           and 2 <= len(e.senses[0].definition.split()) <= max_definition_words]
    fit.sort(key=lambda e: (-e.tagged, -len(e.senses), e.word))
    return [Word.from_entry(e) for e in fit[:count]]


def is_held_out(word: str, fraction: float, seed: int = 0) -> bool:
    """A fixed, seeded coin per word: held-out words are never in a conversation."""
    digest = hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_words(words: list[Word], held_out_fraction: float, seed: int = 0) -> tuple[list[Word], list[Word]]:
    """(training words, held-out words), by `is_held_out`, with `without_leaks` applied to the training words."""
    held = [is_held_out(w.word, held_out_fraction, seed) for w in words]
    held_out = [w for w, h in zip(words, held) if h]
    return without_leaks([w for w, h in zip(words, held) if not h], held_out), held_out


def without_leaks(words: list[Word], held_out: list[Word]) -> list[Word]:
    """`words` fit for conversations: synonyms share a sense, so nothing of a held-out word may reach a
    conversation through another word. A word with a held-out word's definition is dropped, and held-out
    words are taken out of the others' synonyms and example sentences."""
    definitions = {w.definition for w in held_out}
    names = {w.word for w in held_out}
    examples = {e for w in held_out for e in w.examples}
    return [dataclasses.replace(w, synonyms=tuple(s for s in w.synonyms if s not in names),
                                examples=tuple(e for e in w.examples if e not in examples))
            for w in words if w.word not in names and w.definition not in definitions]


def conversations(words: list[Word], kinds: tuple[str, ...] = (DEFINE, USE, SYNONYM)) -> list[dict]:
    """SFT records {prompt, completion} for every question WordNet can answer about `words`."""
    out = []
    for w in words:
        for kind in kinds:
            answer = w.answer(kind)
            if answer is not None:
                out.append({"prompt": w.question(kind), "completion": answer})
    return out


# --- the ground truth -------------------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    """Lower-case word tokens, as the metrics count them."""
    return WORD.findall(text.lower())


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the answer's tokens (as a multiset)
    against the reference's."""
    got, want = Counter(tokens(answer)), Counter(tokens(reference))
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


HEAD = re.compile(r"\s*(.+?)\s*\(([a-z]+)\)\s*:\s*(.*)", re.DOTALL)  # "word (pos): definition"


def head_word(answer: str) -> str | None:
    """The word an answer "word (pos): definition." defines (None when it has no such head)."""
    match = HEAD.match(answer)
    return match.group(1) if match else None


def definition_part(answer: str, word: str) -> str:
    """The definition in an answer "word (pos): definition.", or the whole answer when it has no such head
    (the word and the part of speech are not counted as matching the definition)."""
    match = HEAD.match(answer)
    return match.group(3) if match else answer


def definition_f1(answer: str, word: Word) -> float:
    """The definition accuracy of an answer to "What does X mean?": token F1 against WordNet's definition."""
    return token_f1(definition_part(answer, word.word), word.definition)


def part_of_speech(answer: str) -> str | None:
    """The part of speech an answer states: the first of noun/verb/adjective/adverb it names."""
    found = [(m.start(), pos) for pos in PARTS_OF_SPEECH for m in [re.search(rf"\b{pos}\b", answer.lower())] if m]
    return min(found)[1] if found else None


def repetition(answer: str) -> float:
    """The share of an answer's word bigrams that repeat an earlier one (0: none; looping text: near 1)."""
    words = tokens(answer)
    bigrams = list(zip(words, words[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def annotator_score(answer: str, word: Word) -> float:
    """The simulated annotator's rule for an answer to "What does X mean?", higher is better:

        token F1 of its definition with WordNet's
        − 1   if it defines another word (a wrong fact), − 0.5 if it names no word (not a dictionary answer)
        − 0.5 if it states a part of speech other than the word's (a wrong fact)
        − 0.5 × the share of repeated bigrams (repetition)
        = −2  if it says nothing
    """
    if not tokens(answer):
        return -2.0
    score = definition_f1(answer, word)
    defined = head_word(answer)
    if defined is None:
        score -= 0.5
    elif defined.lower() != word.word.lower():
        score -= 1.0
    stated = part_of_speech(answer)
    if stated is not None and stated != word.pos:
        score -= 0.5
    return score - 0.5 * repetition(answer)


def rank_answers(answers: list[str], word: Word) -> tuple[list[int], list[int]]:
    """(answer indices best first by `annotator_score`, the ones left out): of answers that score exactly
    the same only the first is ranked, since the rule cannot tell them apart."""
    scores = [annotator_score(a, word) for a in answers]
    kept, seen = [], set()
    for i in sorted(range(len(answers)), key=lambda i: (-scores[i], i)):
        if scores[i] not in seen:
            kept.append(i)
            seen.add(scores[i])
    return kept, sorted(set(range(len(answers))) - set(kept))
