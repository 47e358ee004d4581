"""The demo's data readers: WordNet's database files, the Python docs' reStructuredText, chatterbot's YAML."""

from pathlib import Path

import pytest

from chatforge.demo.corpora import (
    WORDNET_DIRS, chatterbot_conversations, find_data, parse_data_line, parse_gloss, read_wordnet, rst_to_text,
    wordnet_prose,
)
from chatforge.errors import UserError

WORDNET = Path(WORDNET_DIRS[0])
needs_wordnet = pytest.mark.skipif(not (WORDNET / "data.noun").is_file(),
                                   reason="WordNet is not installed (Debian: apt-get install wordnet-base)")


def test_glosses_split_into_definition_and_examples():
    assert parse_gloss('a steady trot like that of a dog  ') == ("a steady trot like that of a dog", [])
    assert parse_gloss('move fast; "He ran to the store"; "run, Lola!"') == ("move fast", ["He ran to the store", "run, Lola!"])
    line = ("00001740 00 a 01 able 0 005 = 05200169 n 0000 ! 00002098 a 0101 | (usually followed by `to') having the "
            'necessary means or skill; "able to swim"')
    synset = parse_data_line(line)
    assert (synset.offset, synset.pos, synset.words) == (1740, "adjective", ["able"])
    assert synset.definition == "(usually followed by `to') having the necessary means or skill"
    assert synset.examples == ["able to swim"]
    marked = parse_data_line("00003700 00 s 02 galore(ip) 0 in_abundance(ip) 0 000 | in great numbers")
    assert marked.words == ["galore", "in abundance"] and marked.pos == "adjective"


@pytest.fixture(scope="module")
def wordnet():
    return {(e.word, e.pos): e for e in read_wordnet(WORDNET)}


@needs_wordnet
def test_wordnet_reader_against_known_entries(wordnet):
    assert len(wordnet) > 140_000  # WordNet 3.0: 155,287 (word, part of speech) entries
    dog = wordnet["dog", "noun"]
    assert len(dog.senses) == 7 and dog.tagged == 1
    first = dog.senses[0]
    assert first.definition.startswith("a member of the genus Canis (probably descended from the common wolf)")
    assert first.examples == ["the dog barked all night"]
    assert dog.synonyms() == ["domestic dog", "Canis familiaris"]
    assert wordnet["run", "verb"].senses[0].definition == "move fast by using one's feet, with one foot off the ground at any given time"
    assert [s.pos for s in wordnet["able", "adjective"].senses] == ["adjective"] * 4
    assert "dog" in [e.word for e in (wordnet.get(("dog", "verb")),) if e]
    prose = wordnet_prose(dog, senses=1)
    assert prose.startswith("dog (noun): a member of the genus Canis") and "Synonyms: domestic dog, Canis familiaris." in prose


def test_a_malformed_wordnet_line_names_its_file_and_line(tmp_path):
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text(header)
        (tmp_path / f"index.{pos}").write_text(header)
    (tmp_path / "data.noun").write_text(header + "00001740 03 n 01 entity 0 000 | that which exists\n"
                                        + "00001930 03 n zz broken\n")
    with pytest.raises(UserError, match=rf"{tmp_path / 'data.noun'}:3: not a WordNet data line"):
        read_wordnet(tmp_path)
    (tmp_path / "data.noun").write_text(header + "00001740 03 n 01 entity 0 000 | that which exists\n")
    (tmp_path / "index.noun").write_text(header + "entity n 1 1 ~ 1 1 00001740\nthing n 1 0 1 0 99999999\n")
    with pytest.raises(UserError, match=rf"{tmp_path / 'index.noun'}:3: not a WordNet index line"):
        read_wordnet(tmp_path)


def test_restructured_text_becomes_prose():
    source = """\
.. _tut-intro:

**********************
An Informal Intro
**********************

.. index:: single: comment

The :func:`len` function and the :class:`~collections.OrderedDict` class, see
`the docs <https://docs.python.org>`_ and ``x = 1`` with *emphasis* (:ref:`more here <tut-more>`).
For example::

   >>> print("code is dropped")

.. note::

   A note body that is dropped.

=====  ======
Name   Value
=====  ======
a      1
=====  ======

Back to prose.
"""
    text = rst_to_text(source)
    assert text.splitlines()[0] == "An Informal Intro"
    assert "The len function and the OrderedDict class, see\nthe docs and x = 1 with emphasis (more here)." in text
    assert "For example." in text and "Back to prose." in text
    for gone in ("code is dropped", "note body", "index::", "tut-intro", "tut-more", "*****", "Name", "<https"):
        assert gone not in text, gone


def test_chatterbot_conversations(tmp_path):
    (tmp_path / "greetings.yml").write_text("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there\n"
                                            "- - How are you?\n  - Fine.\n  - Good to hear.\n- - lonely\n")
    assert chatterbot_conversations(tmp_path) == [("greetings.yml:0", ["Hello", "Hi there"]),
                                                  ("greetings.yml:1", ["How are you?", "Fine.", "Good to hear."])]
    (tmp_path / "broken.yml").write_text("conversations: [unclosed\n")
    with pytest.raises(UserError, match="broken.yml: not valid YAML"):
        chatterbot_conversations(tmp_path)
    pytest.importorskip("chatterbot_corpus", reason="chatterbot-corpus is not installed")
    assert len(chatterbot_conversations()) > 1000


def test_missing_data_says_what_to_install(tmp_path):
    with pytest.raises(UserError, match="wordnet-base.*python3.11-doc"):
        find_data(tmp_path)
