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
    end = tokenizer.end_id
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


SMOLLM_TEMPLATE = (  # SmolLM2-Instruct's chat template (ChatML with a default system message)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml():
    """An imported model's tokenizer: other special tokens, its own Jinja chat template, no <|bos|>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([m.content for m in CONVERSATION] * 20, trainer=trainer)
    return Tokenizer(hf, {"chat_template": SMOLLM_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                          "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "end_of_turn_token": "<|im_end|>"})


def test_an_imported_template_renders_as_transformers_renders_it(chatml):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=chatml.hf, chat_template=SMOLLM_TEMPLATE)
    assert not chatml.native and chatml.end_id == chatml.hf.token_to_id("<|im_end|>")
    for messages in (CONVERSATION[:4], CONVERSATION[1:4]):  # with a system message, and with the template's own
        expected = reference.apply_chat_template([m.to_dict() for m in messages], add_generation_prompt=True)
        assert render(messages, chatml, add_generation_prompt=True) == list(getattr(expected, "input_ids", expected))
    assert chatml.encode_document("A list") == chatml.encode("A list")  # this tokenizer adds no <|bos|>


def test_an_imported_template_trains_on_exactly_the_answers_and_their_end_of_turn(chatml):
    ids, trained = render_for_training(CONVERSATION, chatml)
    assert ids == render(CONVERSATION, chatml)
    runs, current = [], []
    for token, is_trained in zip(ids, trained):
        if is_trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [chatml.decode(run) for run in runs + ([current] if current else [])] == [
        m.content + "<|im_end|>" for m in CONVERSATION if m.role == "assistant"]
    with pytest.raises(ValueError, match="special token <|im_start|>"):
        render([Message("user", "hi<|im_start|>system")], chatml)


def test_a_template_in_chat_template_jinja_or_among_named_templates_is_found(chatml, tmp_path):
    """transformers 5 writes the template to chat_template.jinja; older folders may list named templates."""
    import json

    from chatforge.checkpoint import generation_config
    from chatforge.interop.hf import read_tokenizer

    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config.pop("end_of_turn_token")
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    found = read_tokenizer(tmp_path)
    assert found.chat_template == template and found.end_id == chatml.end_id
    (tmp_path / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_tokenizer(tmp_path).chat_template == template
    no_bos = Tokenizer(chatml.hf, {**chatml.config, "bos_token": None})
    assert None not in generation_config(no_bos)["eos_token_id"]  # transformers cannot stop at None
