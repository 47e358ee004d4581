import pytest

from chatforge.errors import UserError
from chatforge.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_bpe

from conftest import TEST_VOCAB, assert_one_line_error, run_cli

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF\n",
    "中文文本：机器学习很有趣。日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷 and combining é (e\u0301) \u200b zero-width",
    "def f(x: int) -> int:\n    return x ** 2  # code { } [ ] <>\n",
    "Ünïcödé \u0000 control \x07 chars and math ∑∫√∞ ≠ ≤",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_vocab_size_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == TEST_VOCAB
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(token) == [index]  # one id each, the first ids
    text = f"{SPECIAL_TOKENS[4]}hi{SPECIAL_TOKENS[6]}"
    assert tokenizer.encode(text)[0] == 4 and tokenizer.encode(text)[-1] == 6
    assert tokenizer.decode(tokenizer.encode(text), skip_special=True) == "hi"


def test_hugging_face_loads_the_same_tokenizer(tokenizer, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for text in TEXTS:
        assert fast.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert auto.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == tuple(SPECIAL_TOKENS[:3])
    assert auto.pad_token_id == tokenizer.pad_id


def test_vocab_too_small_for_special_tokens():
    with pytest.raises(UserError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_bpe(["some text"], MIN_VOCAB_SIZE - 1)


def test_cli_trains_and_rejects_a_too_small_vocab(corpus, tmp_path):
    run_cli("tokenizer", "train", corpus, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 300
    result = run_cli("tokenizer", "train", corpus, "--vocab-size", 100, "--out", tmp_path / "bad", check=False)
    assert_one_line_error(result, "vocab size 100 is too small", str(MIN_VOCAB_SIZE))
    assert not (tmp_path / "bad").exists()


def test_streamed_pieces_add_up_to_the_decoded_text(tokenizer):
    """Pieces are released only at whole characters (é, 日本, emoji span several byte tokens), each token
    decoding only what is pending; together with the flush they are exactly the full decode, also for
    random token soup with broken UTF-8 and special tokens."""
    import random

    from chatforge.tokenizer import IncrementalDecoder

    rng = random.Random(0)
    sequences = [tokenizer.encode(text) for text in ("café 日本語 🙂 naïve", "a\u00e9b\U0001F600c", "plain words")]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(60)] for _ in range(20)]
    for ids in sequences:
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(t) for t in ids]
        assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids, skip_special=True)
        assert all(not p.endswith("\ufffd") for p in pieces)
    decoder = IncrementalDecoder(tokenizer)
    emoji = tokenizer.encode("🙂")
    assert len(emoji) > 1 and [decoder.push(t) for t in emoji] == [""] * (len(emoji) - 1) + ["🙂"]
