"""The demo's assistant is a dictionary: questions about words, answered from WordNet.

Words are split once, by a seeded hash, into training words (their conversations are in SFT, their prompts
in the preferences and in PPO) and held-out words (their WordNet entries are in the pretraining text, but
never in a conversation: the evaluation asks about them). Format words, beyond the demo's slice, are only
asked about in SFT: they teach the form of an answer on more words than a small model can learn by heart.
Three kinds of question:

    What does "X" mean?        ->  X (noun): <the first sense's definition>.
    Use "X" in a sentence.     ->  <WordNet's example sentence>
    Give a synonym for "X".    ->  <a synonym>

The ground truth is stated and deterministic (`definition_f1`, `part_of_speech`, `is_degenerate`), and the
simulated annotator ranks answers by a rule anyone can read (`annotator_score`). Both count content words
only: a metric that counts "a", "of" and "or" is won by word soup that shares them with most definitions
("war (verb): be in a or as of."), which is what PPO learned against the earlier, all-token F1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from chatforge.demo.corpora import PROSE_SENSES, Entry

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
    """A word of the demo, with its one part of speech, its first (most frequent) sense, whose definition the
    conversations teach, and the definitions of the senses the ground truth accepts (`senses`, the first one
    first; empty means the first sense only)."""

    word: str
    pos: str
    definition: str
    examples: tuple[str, ...]
    synonyms: tuple[str, ...]
    senses: tuple[str, ...] = ()

    @classmethod
    def from_entry(cls, entry: Entry) -> "Word":
        sense = entry.senses[0]
        return cls(entry.word, entry.pos, sense.definition, tuple(sense.examples), tuple(entry.synonyms()),
                   tuple(s.definition for s in entry.senses[:PROSE_SENSES]))

    @property
    def definitions(self) -> tuple[str, ...]:
        """The definitions an answer is scored against: every sense's, the first one first."""
        return self.senses or (self.definition,)

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

# NLTK's English stop-word list (179 words), with "e.g." and "i.e." read as the tokens they split into:
# function words carry no meaning of their own, and a definition made of them is word soup.
STOP_WORDS = frozenset("""
    a about above after again against ain all am an and any are aren aren't as at be because been before being
    below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don don't down
    during each few for from further had hadn hadn't has hasn hasn't have haven haven't having he her here hers
    herself him himself his how i if in into is isn isn't it it's its itself just ll m ma me mightn mightn't
    more most mustn mustn't my myself needn needn't no nor not now o of off on once only or other our ours
    ourselves out over own re s same shan shan't she she's should should've shouldn shouldn't so some such t
    than that that'll the their theirs them themselves then there these they this those through to too under
    until up ve very was wasn wasn't we were weren weren't what when where which while who whom why will with
    won won't wouldn wouldn't y you you'd you'll you're you've your yours yourself yourselves e g
""".split())


# The dictionary genre's own function words: every word other than a stop word that is in at least 0.5% of
# WordNet 3.0's 117,655 glosses (`common_gloss_words`; a test recomputes it from the installed WordNet).
# "the act of something", "a person who ...", "relating to ..." fit a good share of all definitions, so
# an answer made of them says nothing about the word asked (PPO learned exactly that stock reply when they
# counted).
GLOSS_WORDS = frozenset("""
    act america american another area black blood body born cause central characteristic characterized city
    common consisting containing eastern english especially family first flowers food form found fruit genus
    group herbs high language large leaves light like long made make manner member native new north northern
    often old one order part people perennial person place plant plants position quality red relating
    resembling several shaped short small someone something sometimes south southern state states surface
    system time together tree trees tropical two type unit united use used usually various water western white
    whose without world yellow
""".split())


def tokens(text: str) -> list[str]:
    """Lower-case word tokens, as the metrics count them."""
    return WORD.findall(text.lower())


def content_words(text: str, word: str = "") -> list[str]:
    """The tokens of `text` that carry meaning: not a stop word (`STOP_WORDS`), not one of the words most
    definitions use (`GLOSS_WORDS`), not a part-of-speech name, and not the word being defined (repeating it
    defines nothing)."""
    left_out = STOP_WORDS | GLOSS_WORDS | set(PARTS_OF_SPEECH) | set(tokens(word))
    return [t for t in tokens(text) if t not in left_out]


def common_gloss_words(entries: list[Entry], share: float = 0.005) -> set[str]:
    """The words other than stop words that are in at least `share` of the distinct glosses of `entries`."""
    glosses = {(s.offset, s.pos): s.definition for e in entries for s in e.senses}
    counts = Counter(w for gloss in glosses.values() for w in set(tokens(gloss)) - STOP_WORDS)
    return {w for w, n in counts.items() if n >= share * len(glosses)}


def bag_f1(got: list[str], want: list[str]) -> float:
    """SQuAD's F1 of two token lists: the harmonic mean of precision and recall of `got` (a multiset)
    against `want`."""
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


HEAD = re.compile(r"\s*(.+?)\s*\(([a-z]+)\)\s*:\s*(.*)", re.DOTALL)  # "word (pos): definition"


def head_word(answer: str) -> str | None:
    """The word an answer "word (pos): definition." defines (None when it has no such head)."""
    match = HEAD.match(answer)
    return match.group(1) if match else None


def with_part_of_speech(answer: str, pos: str) -> str | None:
    """An answer "word (pos): definition." restated with part of speech `pos` (None when it has no such head)."""
    match = HEAD.match(answer)
    return f"{match.group(1)} ({pos}): {match.group(3)}" if match else None


def definition_part(answer: str) -> str:
    """The definition in an answer "word (pos): definition.", or the whole answer when it has no such head
    (the word and the part of speech are not counted as matching the definition)."""
    match = HEAD.match(answer)
    return match.group(3) if match else answer


def definition_f1(answer: str, word: Word) -> float:
    """The definition accuracy of an answer to "What does X mean?": the F1 of the content words
    (`content_words`) of its definition against those of WordNet's definition of each sense the pretraining
    text holds (the first three, `corpora.PROSE_SENSES`), the best sense counting. Not only the first sense,
    because the question gives no context: an answer with the word's second meaning is right, not wrong.
    Not every sense either: common words have dozens, some glossed in one or two words, and a short generic
    answer would match one of them by chance. Words match exactly (no stemming)."""
    return senses_f1(content_words(definition_part(answer), word.word), word)


def senses_f1(got: list[str], word: Word) -> float:
    """The best F1 of the content words `got` against the content words of one of the word's definitions."""
    wants = [content_words(d, word.word) for d in word.definitions]
    return max((bag_f1(got, want) for want in wants if want), default=0.0)


def defines_another_word(answer: str, word: Word) -> bool:
    """Whether the answer's head names a word other than the one asked about."""
    defined = head_word(answer)
    return defined is not None and defined.lower() != word.word.lower()


def is_degenerate(answer: str, word: Word) -> bool:
    """A degenerate answer, whatever its score: it defines another word, or its definition has no content
    word (silence, or word soup made of function words). Reported beside the scores, so that reward
    hacking shows in the table instead of hiding inside an average."""
    return defines_another_word(answer, word) or not content_words(definition_part(answer), word.word)


def repeated_answer_rate(answers: list[str]) -> float:
    """The share of answers whose definition (its word tokens) is also the answer given about another word:
    a stock reply, the commonest sign of a policy that learned to please its reward model instead of
    answering."""
    definitions = [tuple(tokens(definition_part(a))) for a in answers]
    counts = Counter(definitions)
    return sum(1 for d in definitions if d and counts[d] > 1) / max(len(answers), 1)


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

        `definition_f1` (content words, the best sense)
        − 1   if it defines another word (a wrong fact), − 0.5 if it names no word (not a dictionary answer)
        − 0.5 if its definition has no content word (it says nothing about the meaning: word soup)
        − 0.5 if it states a part of speech other than the word's (a wrong fact)
        − 0.5 × the share of repeated bigrams (repetition)
        = −2  if it says nothing
    """
    if not tokens(answer):
        return -2.0
    content = content_words(definition_part(answer), word.word)
    score = senses_f1(content, word)
    if head_word(answer) is None:
        score -= 0.5
    elif defines_another_word(answer, word):
        score -= 1.0
    if not content:
        score -= 0.5
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
