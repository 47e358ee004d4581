"""The dictionary task of the demo: words, questions, the ground-truth metrics and the simulated annotator."""

from pathlib import Path

import pytest

from chatforge.demo.corpora import WORDNET_DIRS, Entry, Synset
from chatforge.demo.dictionary import (
    DEFINE, GLOSS_WORDS, STOP_WORDS, SYNONYM, USE, Word, annotator_score, bag_f1, common_gloss_words, content_words,
    conversations, definition_f1, demo_words, head_word, is_degenerate, is_held_out, part_of_speech, rank_answers,
    repeated_answer_rate, repetition, split_words, tokens, with_part_of_speech,
)


DOG = Word("dog", "noun", "a domesticated member of the genus Canis", ("the dog barked all night",), ("domestic dog",),
           ("a domesticated member of the genus Canis", "someone who is morally reprehensible"))


def token_f1(answer: str, reference: str) -> float:
    """The all-token F1 the demo used before it counted content words only."""
    return bag_f1(tokens(answer), tokens(reference))


def test_bag_f1_by_hand():
    assert token_f1("a member of the genus", "a member of the genus") == 1.0
    # answer 4 tokens, reference 6, 3 in common: P = 3/4, R = 3/6 -> F1 = 0.6
    assert token_f1("a member of cats", "a member of the genus Canis") == pytest.approx(0.6)
    assert token_f1("", "a dog") == 0.0 and token_f1("The DOG.", "the dog") == 1.0


def test_content_words_leave_out_stop_words_gloss_words_the_head_word_and_parts_of_speech():
    assert len(STOP_WORDS) == 181 and {"a", "of", "or", "be", "in", "as", "the"} <= STOP_WORDS
    assert len(GLOSS_WORDS) == 94 and {"act", "something", "person", "relating"} <= GLOSS_WORDS
    assert content_words("A dog (noun): a noun for a Dog of the genus Canis.", "dog") == ["canis"]
    assert content_words("be in a or as of") == []
    assert content_words("the act of a person or something that is used") == []  # a stock reply says nothing


@pytest.mark.skipif(not any(Path(d).is_dir() for d in WORDNET_DIRS), reason="WordNet is not installed (make demo-data)")
def test_gloss_words_are_the_words_in_half_a_percent_of_wordnet_glosses():
    from chatforge.demo.corpora import find_data, read_wordnet

    assert common_gloss_words(read_wordnet(find_data(None)["wordnet"])) == GLOSS_WORDS


def test_definition_accuracy_counts_content_words_against_the_best_sense():
    assert definition_f1("dog (noun): a domesticated member of the genus Canis.", DOG) == 1.0
    assert definition_f1("a domesticated member of the genus Canis", DOG) == 1.0  # no head: all of it
    # "a kind of tree": content words {kind} against {domesticated, canis}: nothing common
    assert definition_f1("dog (noun): a kind of tree.", DOG) == 0.0
    # {domesticated, cat}: P = 1/2, R = 1/2 against the first sense
    assert definition_f1("dog (noun): a domesticated cat.", DOG) == pytest.approx(0.5)
    # the second sense counts as much as the first: {someone, morally, reprehensible} exactly
    assert definition_f1("dog (noun): someone morally reprehensible.", DOG) == 1.0
    assert definition_f1("dog (noun): the dog.", DOG) == 0.0  # the word itself defines nothing


def test_word_soup_scores_below_an_honest_wrong_definition_and_far_below_a_right_one():
    """What PPO learned against the old all-token F1 ("war (verb): be in a or as of."), which shares "be",
    "or", "of", "a", "in" with most WordNet definitions."""
    war = Word("war", "noun", "the waging of armed conflict against an enemy", (), (),
               ("the waging of armed conflict against an enemy", "a concerted campaign to end something that is injurious"))
    soup, wrong, right = "war (noun): be in a or as of.", "war (noun): a sport played with a ball.", "war (noun): armed conflict against an enemy."
    # the old metric (token F1 of the definition, every token) preferred the soup: it shares "of"
    assert token_f1("be in a or as of", war.definition) > token_f1("a sport played with a ball", war.definition) == 0
    assert definition_f1(soup, war) == 0.0 and is_degenerate(soup, war)
    assert definition_f1(wrong, war) == 0.0 and not is_degenerate(wrong, war)
    assert definition_f1(right, war) > 0.8 and not is_degenerate(right, war)
    assert annotator_score(soup, war) < annotator_score(wrong, war) < annotator_score(right, war) - 0.8
    assert annotator_score(right, war) - annotator_score(soup, war) > 1.2
    stock = "war (noun): the act of a person or something."  # fits any word: no content word left
    assert definition_f1(stock, war) == 0.0 and is_degenerate(stock, war)
    assert annotator_score(stock, war) < annotator_score(wrong, war)
    assert is_degenerate("peace (noun): armed conflict against an enemy.", war)  # defines another word
    assert is_degenerate("", war) and not is_degenerate("armed conflict", war)


def test_repeated_answers_are_the_stock_replies():
    answers = ["a (noun): the act of being true.", "b (noun): the act of being true.", "c (noun): a small dog.",
               "The act of being true", "", ""]
    assert repeated_answer_rate(answers) == pytest.approx(3 / 6)  # the same definition for three words


def test_part_of_speech_and_repetition():
    assert part_of_speech("run (verb): move fast, a noun too") == "verb"
    assert part_of_speech("nothing stated") is None
    assert repetition("a b c d") == 0.0
    assert repetition("the dog the dog the dog") == pytest.approx(1 - 2 / 5)


def test_the_annotator_prefers_the_true_definition_then_penalises_wrong_facts_repetition_and_silence():
    answers = [
        "",                                                            # says nothing
        "dog (verb): a domesticated member of the genus Canis.",       # wrong part of speech
        "dog (noun): domesticated canis domesticated canis domesticated canis.",  # repeats itself
        "dog (noun): a domesticated member of the genus Canis.",       # right
        "cat (noun): a domesticated member of the genus Canis.",       # defines another word
        "a domesticated member of the genus Canis",                    # no dictionary head
        "dog (noun): a domesticated member of the genus Canis.",       # the same as answer 3
        "dog (noun): be in a or as of.",                               # word soup: no content word
    ]
    assert annotator_score(answers[3], DOG) == 1.0
    assert annotator_score(answers[1], DOG) == pytest.approx(0.5)
    assert annotator_score(answers[5], DOG) == pytest.approx(0.5)
    assert annotator_score(answers[0], DOG) == -2.0
    assert annotator_score(answers[7], DOG) == -0.5
    # "cat": the right definition (F1 1), minus 1 for the wrong word
    assert annotator_score(answers[4], DOG) == pytest.approx(0.0)
    # 2 of its 6 content words match all 2 of the sense's: P = 1/3, R = 1, F1 = 0.5, minus 0.5 x the repeated
    # bigrams (3 of 7)
    assert annotator_score(answers[2], DOG) == pytest.approx(0.5 - 0.5 * 3 / 7)
    # answers 5 and 6 score exactly as 1 and 3 do, and the rule cannot tell them apart: they are left out
    assert rank_answers(answers, DOG) == ([3, 1, 2, 4, 7, 0], [5, 6])
    assert head_word(answers[4]) == "cat" and head_word(answers[5]) is None
    assert with_part_of_speech("dog (noun): a domestic animal.", "verb") == "dog (verb): a domestic animal."
    assert with_part_of_speech("a domestic animal.", "verb") is None  # no head to restate


def test_definition_pairs_are_the_ranked_pairs_only_the_definition_decides():
    from chatforge.demo.pipeline import definition_pair_accuracy

    answers = [
        "dog (noun): a domesticated member of the genus Canis.",  # F1 1
        "dog (noun): a member of the genus Canis.",               # F1 0.67, no penalty: a definition pair with 0
        "dog (noun): a loud engine.",                             # F1 0, no penalty: a definition pair with 0 and 1
        "dog (verb): a domesticated member of the genus Canis.",  # F1 1, wrong part of speech: no pair
        "cat (noun): a loud engine.",                             # another word defined: no pair
    ]
    ranking, tied = rank_answers(answers, DOG)
    assert ranking == [0, 1, 3, 2, 4] and not tied
    record = {"completions": answers, "ranking": ranking}
    right = definition_pair_accuracy([(record, DOG)], [3.0, 2.0, 1.0, 9.0, -9.0])  # the penalties' pairs ignored
    assert right == {"pairs": 3, "accuracy": 1.0}
    assert definition_pair_accuracy([(record, DOG)], [3.0, 1.0, 2.0, 0.0, 0.0])["accuracy"] == pytest.approx(2 / 3)
    assert definition_pair_accuracy([(record, DOG), (record, DOG)], [1.0, 2.0, 3.0, 0, 0] * 2) == {"pairs": 6, "accuracy": 0.0}


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
    assert words[1].definitions == ("a domesticated canine",)  # the senses of the entry the pretraining text holds
    many_senses = Entry("set", "noun", [Synset(i, "noun", ["set"], f"sense {i}", []) for i in range(10)], 5)
    assert Word.from_entry(many_senses).definitions == ("sense 0", "sense 1", "sense 2")
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
