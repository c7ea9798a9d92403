"""Tokenizer: exact ids against two independent references, truncation, padding, errors."""
import json

import pytest
import torch
from reference.clip_bpe import NaiveCLIPBPE

import clipforge
from clipforge.tokenizer import VOCAB_SIZE, CLIPTokenizer, default_bpe_path, get_tokenizer, load_bpe

LONG = " ".join(f"word{i} and the {i}th number" for i in range(200))
CORPUS = [
    "a photo of a dog",
    "Three RED circles, two blue squares!",
    "a blue square left of a green triangle",
    "",
    "   leading and trailing   whitespace\t\ttabs\nnewlines  ",
    "café naïve résumé jalapeño façade Ångström",
    "Straße groß ÆØÅ æøå Œuvre",
    "東京タワーの写真",  # Japanese
    "서울의 야경",  # Korean
    "Москва — столица России",
    "مرحبا بالعالم",
    "हिन्दी में एक वाक्य",
    "emoji: 🐶🐱 👩‍👩‍👧‍👦 🇫🇷 ❤️ 👍🏽",
    "punctuation!!! ??? ... ;;; --- ((nested)) [brackets] {braces} <tags> @#$%^&*",
    "numbers 0 1 12 123 3.14159 1,000,000 2026-11-25 +44 (0)20",
    "it's they're we've I'm you'll he'd DON'T",
    "MiXeD CaSe WoRdS and CamelCaseIdentifiers snake_case_names",
    "http://example.com/path?query=1&x=2 user@example.org",
    "math: x² + y² = z², α β γ ∑ ∫ √2 ≈ 1.414",
    "guillemets «quoted» and dashes – —",
    "a" * 300,
    LONG,
]
# Only the cleaning in OpenAI's tokenizer (ftfy, html.unescape) changes these; the naive
# reference implements it, transformers' CLIPTokenizer does not.
FTFY_CORPUS = ["&amp; &lt;b&gt; fish &amp;amp; chips", "mojibake: cafÃ©", "control\x00char\x07s",
               "quotes “curly” ‘single’", "fullwidth ＡＢＣ１２３ and ligature ﬁ"]


@pytest.fixture(scope="module")
def naive():
    return NaiveCLIPBPE(str(default_bpe_path()))


def test_vocabulary_size_and_special_ids():
    tok = get_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)


def test_ids_equal_naive_reference(naive):
    for n in (77, 16):
        ours = clipforge.tokenize(CORPUS + FTFY_CORPUS, context_length=n)
        ref = torch.tensor(naive.tokenize(CORPUS + FTFY_CORPUS, n))
        for text, a, b in zip(CORPUS + FTFY_CORPUS, ours, ref):
            assert a.tolist() == b.tolist(), f"mismatch on {text[:40]!r}"


def test_ids_equal_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = load_bpe()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = clipforge.tokenize(CORPUS, context_length=77)
    for text, row in zip(CORPUS, ours):
        ref = hf(text, truncation=True, max_length=77)["input_ids"]
        assert row[: len(ref)].tolist() == ref, f"mismatch on {text[:40]!r}"
        assert (row[len(ref):] == 0).all()


def test_truncation_keeps_end_token_and_padding_is_zero():
    ids = clipforge.tokenize([LONG, "two words"], context_length=20)
    assert ids.shape == (2, 20) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407
    assert ids[1, :4].tolist()[0] == 49406 and ids[1, 3] == 49407 and (ids[1, 4:] == 0).all()


def test_single_string_and_decode_round_trip():
    tok = CLIPTokenizer(32)
    ids = tok("Three red circles")
    assert ids.shape == (1, 32)
    assert tok.decode(ids[0]) == "three red circles"


def test_special_markers_in_text_are_single_tokens():
    ids = clipforge.tokenize(["a <|endoftext|> b"])[0].tolist()
    # "a</w>" = 256 + (ord("a") - ord("!")) = 320, "b</w>" = 321
    assert ids[:5] == [49406, 320, 49407, 321, 49407]


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="expects strings.*int"):
        clipforge.tokenize(["ok", 3])
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(1)


def test_ftfy_shortcut_is_safe():
    """Text over the shortcut's alphabet is exactly what ftfy + html.unescape would leave."""
    import html
    import random

    import ftfy

    from clipforge.tokenizer import _FTFY_INERT

    alphabet = [c for c in map(chr, range(128)) if _FTFY_INERT.fullmatch(c)]
    assert "&" not in alphabet and "\x0b" not in alphabet and "a" in alphabet and ";" in alphabet
    rng = random.Random(0)
    for _ in range(3000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert html.unescape(html.unescape(ftfy.fix_text(t))) == t, repr(t)
