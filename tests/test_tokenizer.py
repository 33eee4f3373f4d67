"""The bundled GPT-2 BPE against tiktoken's own "gpt2" encoding, and the character tokenizer."""

import hashlib
import shutil
from importlib import resources

import pytest
import tiktoken

from jaxgpt.errors import TokenizerError
from jaxgpt.tokenizer import ENDOFTEXT, CharTokenizer, get_tokenizer

TEXTS = [
    "Hello world. This is a real tokenization test.",
    "Hola mundo. Esta es una prueba de tokenización real.",
    "¿Qué tal? Ñandú, pingüino, acción, corazón — ¡olé!",
    "Emoji: 🎉🚀👩‍💻 and flags 🇪🇸",
    "def f(x):\n    return x**2  # square\n\n\tif x != 0: print(f'{x!r}')",
    "runs   of    whitespace\n\n\n   and trailing   ",
    "It's we'll they've I'd you're DON'T 1234567 3.14159",
    "中文字符 日本語のテキスト 한국어",
    "",
]


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own "gpt2" encoding, offline: its download cache is pre-filled with our files,
    named the way tiktoken names them (sha1 of the URL)."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    assets = resources.files("jaxgpt") / "assets" / "gpt2-bpe"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        with resources.as_file(assets / name) as src:
            shutil.copy(src, cache / key)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        yield tiktoken.get_encoding("gpt2")
    finally:
        mp.undo()


def test_readme_check_sentence():
    enc = get_tokenizer("gpt2")
    ids = enc.encode("Hello world. This is a real tokenization test.")
    assert ids == [15496, 995, 13, 770, 318, 257, 1103, 11241, 1634, 1332, 13]


def test_spanish_sentence_has_20_tokens(tiktoken_gpt2):
    text = "Hola mundo. Esta es una prueba de tokenización real."
    ids = get_tokenizer("gpt2").encode(text)
    assert len(ids) == 20
    assert ids == tiktoken_gpt2.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken(tiktoken_gpt2, text):
    enc = get_tokenizer("gpt2")
    ids = enc.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert enc.decode(ids) == text


def test_endoftext_handling(tiktoken_gpt2):
    enc = get_tokenizer("gpt2")
    text = f"first document{ENDOFTEXT}second"
    # Like tiktoken, special tokens in text are refused unless allowed explicitly.
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode(text)
    ids = enc.encode(text, allowed_special={ENDOFTEXT})
    assert 50256 in ids and ids == tiktoken_gpt2.encode(text, allowed_special={ENDOFTEXT})
    assert enc.eot_token == 50256 and enc.n_vocab == 50257


def test_char_tokenizer_roundtrip(tmp_path):
    tok = CharTokenizer.from_text("to be or not to be\n")
    assert tok.n_vocab == len(set("to be or not to be\n"))
    ids = tok.encode("be not")
    assert tok.decode(ids) == "be not"
    tok.save(tmp_path / "vocab.json")
    again = get_tokenizer("char", tmp_path / "vocab.json")
    assert again.encode("to be") == tok.encode("to be")
    with pytest.raises(TokenizerError, match="not in this"):
        tok.encode("xyz")


def test_unknown_tokenizer():
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("gpt5")


def test_decode_refuses_ids_outside_the_vocabulary():
    char = CharTokenizer("abc")
    assert char.decode([0, 2]) == "ac"
    for tok in (char, get_tokenizer("gpt2")):
        n = tok.n_vocab
        for bad in (n, -1):
            with pytest.raises(TokenizerError, match=f"token id {bad} is outside .* {n - 1}"):
                tok.decode([0, bad])
    # The GPT-2 encoding is still tiktoken's: valid ids decode exactly as tiktoken decodes them.
    enc = get_tokenizer("gpt2")
    assert enc.decode([15496, 11, 50256]) == "Hello,<|endoftext|>"
