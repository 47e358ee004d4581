"""The one chat template of the project, built on the tokenizer's role tokens.

    <|bos|><|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

Each message is its role token, its content as ordinary text tokens, then <|end|>. A prompt for the model to
answer ends with a bare <|assistant|> (the generation prompt). `render` and `parse` are exact inverses, and
`JINJA_TEMPLATE` (written into tokenizer_config.json) makes Hugging Face's `apply_chat_template` produce the
same token ids. SFT trains only on what the assistant says: `render_for_training` marks those tokens.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime

from chatforge.tokenizer import ASSISTANT, SPECIAL_TOKENS, SYSTEM, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def check_conversation(messages: list[Message], *, final_assistant: bool = True) -> None:
    """Raise ValueError naming the problem unless `messages` is: an optional system message, then user and
    assistant turns alternating, starting with the user (and ending with the assistant if `final_assistant`)."""
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if m.role not in ROLE_TOKENS:
            raise ValueError(f"message {i}: unknown role {m.role!r} (expected system, user or assistant)")
        if not isinstance(m.content, str):
            raise ValueError(f"message {i} ({m.role}): content must be a string")
        if not m.content.strip():
            raise ValueError(f"message {i} ({m.role}): empty content")
        check_text(m.content, f"message {i} ({m.role})")
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            where = i + (len(messages) - len(turns))
            raise ValueError(f"message {where}: expected {'a user' if i % 2 == 0 else 'an assistant'} turn, got "
                             f"{m.role} (turns must alternate, "
                             f"user first, with at most one system message at the start)")
    if not turns:
        raise ValueError("conversation has a system message but no turns")
    if final_assistant and turns[-1].role != "assistant":
        raise ValueError("conversation must end with an assistant turn")


def prompt_messages(prompt) -> list[Message]:
    """A prompt as the conversation to answer: a string is one user message; a list of {role, content}
    messages must end with the user's turn. ValueError names what is wrong."""
    if isinstance(prompt, str):
        messages = [Message("user", prompt)]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = [Message(m.get("role"), m.get("content")) for m in prompt]
    else:
        raise ValueError("'prompt' must be a string or a list of {role, content} messages")
    try:
        check_conversation(messages, final_assistant=False)
        if messages[-1].role != "user":
            raise ValueError("must end with a user message (the answer replies to it)")
    except ValueError as e:
        raise ValueError(f"'prompt': {e}") from None
    return messages


def check_text(text: str, what: str) -> None:
    """Text that would encode to special tokens could forge turns (or teach the model to emit them); text
    that is not Unicode cannot be encoded at all (`check_unicode`)."""
    check_unicode(text, what)
    found = [token for token in SPECIAL_TOKENS if token in text]
    if found:
        raise ValueError(f"{what}: contains the special token {found[0]}")


def check_unicode(text: str, what: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}: not valid Unicode (a lone surrogate at character {e.start})") from None


def render_for_training(messages: list[Message], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation, and for each id whether it is trained on: the assistant's content and
    its end of turn (so the model learns to stop), never the role tokens, the user or the system."""
    if not tokenizer.native:
        return _render_template_for_training(messages, tokenizer)
    ids, trained = [tokenizer.bos_id], [False]
    end = tokenizer.end_id
    for m in messages:
        content = tokenizer.encode(m.content)
        is_assistant = m.role == "assistant"
        ids += [tokenizer.special[ROLE_TOKENS[m.role]], *content, end]
        trained += [False] + [is_assistant] * (len(content) + 1)
    return ids, trained


def render(messages: list[Message], tokenizer: Tokenizer, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the conversation; with `add_generation_prompt`, followed by what opens the reply
    (<|assistant|>, or an imported model's own template's)."""
    if not tokenizer.native:
        return tokenizer.hf.encode(template_text(messages, tokenizer, add_generation_prompt), add_special_tokens=False).ids
    ids, _ = render_for_training(messages, tokenizer)
    return ids + [tokenizer.special[ASSISTANT]] if add_generation_prompt else ids


def answer_text(tokens: list[int], tokenizer: Tokenizer) -> str:
    """The text of a sampled answer: its tokens up to the end of turn, without special tokens."""
    if tokenizer.end_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.end_id)]
    return tokenizer.decode(tokens, skip_special=True)


# --- an imported model's own chat template (Jinja, as `transformers` renders it) --------------------------

@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """Jinja in a sandbox, set up as `transformers`' `apply_chat_template` sets it up, so that a model's template
    renders here exactly as it does there (tested against it)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def template_text(messages: list[Message], tokenizer: Tokenizer, add_generation_prompt: bool) -> str:
    """The conversation as text through the tokenizer's Jinja chat template. Message text that holds one of the
    tokenizer's special tokens is refused: it could forge turns."""
    import jinja2

    for i, m in enumerate(messages):
        found = [token for token in tokenizer.special if token in m.content]
        if found:
            raise ValueError(f"message {i} ({m.role}): contains the special token {found[0]}")
    tokens = {name: tokenizer.config.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    tokens = {name: (t.get("content") if isinstance(t, dict) else t) or "" for name, t in tokens.items()}
    try:
        return _compiled(tokenizer.chat_template).render(
            messages=[m.to_dict() for m in messages], add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the model's chat template refused the conversation: {e}") from None


def _render_template_for_training(messages: list[Message], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """`render_for_training` through a Jinja template: the text of each assistant turn is found by rendering
    the conversation before it with the generation prompt (a prefix of the whole), and the tokens inside it,
    up to and including the end-of-turn token that follows its content, are the trained ones."""
    text = template_text(messages, tokenizer, add_generation_prompt=False)
    end = tokenizer.hf.id_to_token(tokenizer.end_id)
    spans = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prefix = template_text(messages[:i], tokenizer, add_generation_prompt=True)
        content = m.content.strip()  # some templates trim what they are given
        start = text.find(content, len(prefix)) if text.startswith(prefix) else -1
        stop = text.find(end, start + len(content)) if start >= 0 else -1
        if stop < 0:
            raise ValueError(f"message {i}: the chat template does not render the conversation as its prefixes "
                             f"followed by the answer and {end}, so the answer's tokens cannot be found")
        spans.append((start, stop + len(end)))
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    trained = [any(a <= first and last <= b for a, b in spans) for first, last in encoding.offsets]
    return encoding.ids, trained


def fit_prompt(messages: list[Message], tokenizer: Tokenizer, room: int) -> tuple[list[Message], bool]:
    """A prompt (ending with the user's turn) cut to render, with its generation prompt, in `room` tokens,
    and whether it was cut: the oldest exchanges go first, then the system message, then the start of the
    question itself (its end, nearest the answer, stays). ValueError when not even that fits."""
    cut = False
    while (size := len(render(messages, tokenizer, add_generation_prompt=True))) > room:
        cut = True
        system = messages[0].role == "system"
        turns = messages[1:] if system else messages
        if len(turns) > 1:
            messages = messages[:1] + turns[2:] if system else turns[2:]
        elif system:
            messages = turns
        else:
            question = tokenizer.encode(turns[0].content)
            over = size - room
            if over >= len(question):
                raise ValueError(f"longer than the model's context, even cut: the answer leaves no room for its "
                                 f"question ({max(room, 0)} tokens left)")
            messages = [Message("user", tokenizer.decode(question[over:]).lstrip("\ufffd"))]
    return messages, cut


def parse(ids: list[int], tokenizer: Tokenizer) -> list[Message]:
    """Messages from token ids (the inverse of `render`); an unfinished last message is kept as it stands."""
    roles = {tokenizer.special[token]: role for role, token in ROLE_TOKENS.items()}
    end = tokenizer.end_id
    messages: list[Message] = []
    role, content = None, []
    for token in ids:
        if token in roles:
            if role is not None:  # a role token inside a message ends it, unfinished
                messages.append(Message(role, tokenizer.decode(content)))
            role, content = roles[token], []
        elif token == end and role is not None:
            messages.append(Message(role, tokenizer.decode(content)))
            role, content = None, []
        elif role is not None and token != tokenizer.bos_id:
            content.append(token)
    if role is not None and content:
        messages.append(Message(role, tokenizer.decode(content)))
    return messages


def end_of_turn_token(tokenizer: Tokenizer) -> str | None:
    """The special token an imported model's template closes an answer with (ChatML's <|im_end|>), found by
    rendering a short exchange: what an answer must end with to end its turn."""
    probe = [Message("user", "Hello."), Message("assistant", "Hi.")]
    text = template_text(probe, tokenizer, add_generation_prompt=False)
    after = text[text.rfind("Hi.") + len("Hi."):]
    return next((token for token in sorted(tokenizer.special, key=after.find) if after.find(token) >= 0), None)
