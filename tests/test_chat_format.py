import pytest

from chatforge.chat_format import Message, check_conversation, parse, render, render_for_training
from chatforge.tokenizer import Tokenizer

CONVERSATION = [
    Message("system", "You answer in one sentence."),
    Message("user", "What is a list?"),
    Message("assistant", "A mutable sequence: [1, 2, 3]."),
    Message("user", "And a tuple? 中文 😀"),
    Message("assistant", "An immutable one.\n\n(1, 2)"),
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def test_render_and_parse_are_inverses(tokenizer):
    ids = render(CONVERSATION, tokenizer)
    assert parse(ids, tokenizer) == CONVERSATION
    assert render(parse(ids, tokenizer), tokenizer) == ids
    prompt = render(CONVERSATION[:4], tokenizer, add_generation_prompt=True)
    assert prompt[-1] == tokenizer.special["<|assistant|>"]
    assert parse(prompt, tokenizer) == CONVERSATION[:4]
    unfinished = prompt + tokenizer.encode("An imm")
    assert parse(unfinished, tokenizer)[-1] == Message("assistant", "An imm")


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, trained = render_for_training(CONVERSATION, tokenizer)
    assert len(ids) == len(trained)
    end = tokenizer.special["<|end|>"]
    expected = []
    for m in CONVERSATION:
        content = tokenizer.encode(m.content)
        expected += [False] + [m.role == "assistant"] * (len(content) + 1)  # role token, content, <|end|>
    assert trained == [False] + expected  # <|bos|> first
    trained_ids = [t for t, keep in zip(ids, trained) if keep]
    answers = [tokenizer.encode(m.content) + [end] for m in CONVERSATION if m.role == "assistant"]
    assert trained_ids == answers[0] + answers[1]
    assert tokenizer.decode([t for t, keep in zip(ids, trained) if not keep and t >= 7]) == "".join(
        m.content for m in CONVERSATION if m.role != "assistant")


def test_hugging_face_apply_chat_template_gives_the_same_ids(tokenizer, tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)  # writes the Jinja chat_template into tokenizer_config.json
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [m.to_dict() for m in CONVERSATION]
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == render(CONVERSATION, tokenizer)
    assert hf.apply_chat_template(messages[:4], tokenize=True, add_generation_prompt=True, return_dict=False) == render(
        CONVERSATION[:4], tokenizer, add_generation_prompt=True)


@pytest.mark.parametrize("messages, problem", [
    ([], "no messages"),
    ([Message("user", "hi"), Message("bot", "hello")], "unknown role 'bot'"),
    ([Message("user", "  "), Message("assistant", "hello")], "empty content"),
    ([Message("assistant", "hello")], "expected a user turn"),
    ([Message("user", "a"), Message("user", "b")], "expected an assistant turn"),
    ([Message("user", "a"), Message("system", "s"), Message("assistant", "b")], "expected an assistant turn"),
    ([Message("user", "a")], "must end with an assistant turn"),
    ([Message("user", "a <|end|> b"), Message("assistant", "c")], "special token"),
])
def test_invalid_conversations_are_named(messages, problem):
    with pytest.raises(ValueError, match=problem):
        check_conversation(messages)


def test_a_long_prompt_loses_its_oldest_turns_first_then_the_system_then_the_start_of_its_question(tokenizer):
    from chatforge.chat_format import fit_prompt

    prompt = CONVERSATION[:4]
    full = len(render(prompt, tokenizer, add_generation_prompt=True))
    assert fit_prompt(prompt, tokenizer, full) == (prompt, False)
    without_first = [CONVERSATION[0], CONVERSATION[3]]
    fitted, cut = fit_prompt(prompt, tokenizer, full - 1)
    assert cut and fitted == without_first  # the oldest exchange went whole
    room = len(render([CONVERSATION[3]], tokenizer, add_generation_prompt=True))
    assert fit_prompt(prompt, tokenizer, room)[0] == [CONVERSATION[3]]  # then the system message
    fitted, _ = fit_prompt(prompt, tokenizer, room - 3)
    assert len(render(fitted, tokenizer, add_generation_prompt=True)) <= room - 3
    assert CONVERSATION[3].content.endswith(fitted[0].content) and fitted[0].content  # the question's end stays
    with pytest.raises(ValueError, match="leaves no room for its question"):
        fit_prompt(prompt, tokenizer, 3)
