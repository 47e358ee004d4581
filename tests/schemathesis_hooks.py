"""Schemathesis hooks (SCHEMATHESIS_HOOKS) for test_serve.py's fuzz test: lone UTF-16 surrogates in the
request bodies, and the check that they are refused with 400 in OpenAI's error shape.

Schemathesis never generates lone surrogates itself (they cannot be UTF-8 encoded), but JSON carries them
("\\ud800"), so a client can send them: half the generated bodies get one in one of their strings.
"""

import schemathesis
from hypothesis import strategies as st


def string_paths(value, path=()):
    """The path (keys and indices) of every string in a JSON value."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from string_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from string_paths(item, (*path, i))


def with_surrogate(value, path, surrogate: str):
    if not path:
        return value + surrogate
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = with_surrogate(value[path[0]], path[1:], surrogate)
    return copy


def has_surrogate(value) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for path in string_paths(value) for c in get(value, path))


def get(value, path):
    for step in path:
        value = value[step]
    return value


@schemathesis.hook
def flatmap_body(context, body):
    paths = list(string_paths(body))
    if not paths:
        return st.just(body)
    surrogates = st.characters(categories=["Cs"])
    return st.one_of(st.just(body), st.builds(lambda path, s: with_surrogate(body, path, s),
                                              st.sampled_from(paths), surrogates))


@schemathesis.check
def lone_surrogates_are_400(ctx, response, case):
    """A body with a lone surrogate in any string gets 400 in OpenAI's error shape."""
    if not has_surrogate(case.body):
        return
    assert response.status_code == 400, f"{response.status_code} for a lone surrogate: {response.text[:300]}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
