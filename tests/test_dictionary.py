"""The dictionary task of the demo: words, questions, the ground-truth metrics and the simulated annotator."""

import pytest

from chatforge.corpora import Entry, Synset
from chatforge.dictionary import (
    DEFINE, SYNONYM, USE, Word, annotator_score, conversations, definition_f1, demo_words, head_word, is_held_out,
    part_of_speech, rank_answers, repetition, split_words, token_f1,
)

DOG = Word("dog", "noun", "a domesticated member of the genus Canis", ("the dog barked all night",), ("domestic dog",))


def test_token_f1_by_hand():
    assert token_f1("a member of the genus", "a member of the genus") == 1.0
    # answer 4 tokens, reference 6, 3 in common: P = 3/4, R = 3/6 -> F1 = 0.6
    assert token_f1("a member of cats", "a member of the genus Canis") == pytest.approx(0.6)
    assert token_f1("", "a dog") == 0.0 and token_f1("The DOG.", "the dog") == 1.0


def test_definition_accuracy_reads_the_definition_after_the_head():
    assert definition_f1("dog (noun): a domesticated member of the genus Canis.", DOG) == 1.0
    assert definition_f1("a domesticated member of the genus Canis", DOG) == 1.0  # no head: all of it
    # "a kind of tree" against 7 reference tokens, "a" and "of" in common: P = 2/4, R = 2/7
    assert definition_f1("dog (noun): a kind of tree.", DOG) == pytest.approx(2 * (1 / 2) * (2 / 7) / (1 / 2 + 2 / 7))


def test_part_of_speech_and_repetition():
    assert part_of_speech("run (verb): move fast, a noun too") == "verb"
    assert part_of_speech("nothing stated") is None
    assert repetition("a b c d") == 0.0
    assert repetition("the dog the dog the dog") == pytest.approx(1 - 2 / 5)


def test_the_annotator_prefers_the_true_definition_then_penalises_wrong_facts_repetition_and_silence():
    answers = [
        "",                                                            # says nothing
        "dog (verb): a domesticated member of the genus Canis.",       # wrong part of speech
        "dog (noun): a member a member a member of the genus.",        # repeats itself
        "dog (noun): a domesticated member of the genus Canis.",       # right
        "cat (noun): a domesticated member of the genus Felis.",       # defines another word
        "a domesticated member of the genus Canis",                    # no dictionary head
        "dog (noun): a domesticated member of the genus Canis.",       # the same as answer 3
    ]
    assert annotator_score(answers[3], DOG) == 1.0
    assert annotator_score(answers[1], DOG) == pytest.approx(0.5)
    assert annotator_score(answers[5], DOG) == pytest.approx(0.5)
    assert annotator_score(answers[0], DOG) == -2.0
    # "cat": 6 of 7 tokens in common both ways, F1 6/7, minus 1 for the wrong word
    assert annotator_score(answers[4], DOG) == pytest.approx(6 / 7 - 1)
    # repetition (0.475) between the wrong part of speech (0.5) and the wrong word; answers 5 and 6 score
    # exactly as 1 and 3 do, and the rule cannot tell them apart: they are left out
    assert rank_answers(answers, DOG) == ([3, 1, 2, 4, 0], [5, 6])
    assert head_word(answers[4]) == "cat" and head_word(answers[5]) is None


def entry(word, pos, definition, tagged=1, examples=(), words=None):
    return Entry(word, pos, [Synset(0, pos, words or [word], definition, list(examples))], tagged)


def test_demo_words_and_their_split():
    entries = [
        entry("common", "adjective", "belonging to or shared by two or more", tagged=9),
        entry("rare", "adjective", "not widely known", tagged=0),                    # never seen: out
        entry("run", "verb", "move fast by using one's feet", tagged=8),
        entry("run", "noun", "a score in baseball", tagged=5),                       # two parts of speech: out
        entry("Paris", "noun", "the capital of France", tagged=3),                   # a name: out
        entry("ox", "noun", "an adult castrated bull", tagged=4),                    # too short a word: out
        entry("dog", "noun", "a domesticated canine", tagged=7, examples=["the dog barked"], words=["dog", "hound"]),
    ]
    words = demo_words(entries, 10)
    assert [w.word for w in words] == ["common", "dog"]  # most common first
    assert words[1].synonyms == ("hound",) and words[1].answer(USE) == "The dog barked."
    assert words[1].answer(SYNONYM) == "hound." and words[0].answer(USE) is None
    assert words[1].answer(DEFINE) == "dog (noun): a domesticated canine."
    assert {r["prompt"] for r in conversations(words)} == {'What does "common" mean?', 'What does "dog" mean?',
                                                           'Use "dog" in a sentence.', 'Give a synonym for "dog".'}
    many = [Word(f"word{i}", "noun", "a thing", (), ()) for i in range(1000)]
    train, held_out = split_words(many, 0.2, seed=0)
    assert 150 < len(held_out) < 250 and not {w.word for w in train} & {w.word for w in held_out}
    assert split_words(many, 0.2, seed=0) == (train, held_out)  # the same split every run


def test_nothing_of_a_held_out_word_reaches_a_conversation():
    """Synonyms share a sense: a training word must not carry a held-out word's definition, name or example."""
    words = [Word(f"word{i}", "noun", f"sense {i}", (f"example {i}",), ()) for i in range(200)]
    held = next(w for w in words if is_held_out(w.word, 0.2))
    trained = [f"other{i}" for i in range(50) if not is_held_out(f"other{i}", 0.2)]
    twin = Word(trained[0], "noun", held.definition, (), ())  # the same sense as the held-out word
    namer = Word(trained[1], "noun", "names it", (held.examples[0], "its own"), (held.word, "other"))
    train, held_out = split_words([*words, twin, namer], 0.2)
    kept = {w.word: w for w in train}
    assert held in held_out and twin.word not in kept
    assert kept[namer.word].synonyms == ("other",) and kept[namer.word].examples == ("its own",)
