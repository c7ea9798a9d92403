"""The CLIP byte-level BPE tokenizer (Radford et al., 2021), exactly compatible with OpenAI's.

Text is cleaned the way the original ``SimpleTokenizer`` cleans it (``ftfy.fix_text``, HTML
unescaped twice, whitespace collapsed, lower-cased), split with CLIP's pre-tokenization
pattern, mapped to bytes-as-unicode and merged with the 48,894 BPE merges that ship in
``assets/bpe_simple_vocab_16e6.txt.gz`` (OpenAI, MIT license: ``assets/LICENSE-bpe.txt``).
The vocabulary has 49,408 entries: 256 byte symbols, the same 256 with the end-of-word
marker ``</w>``, one token per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
(49407).

The merging itself runs in Hugging Face ``tokenizers`` (Rust, batched, multi-threaded)
rather than in a Python loop: it is the same algorithm, more than 10x faster
(benchmarks/bench_tokenizer.py). The cleaning stays in Python because ftfy has no Rust
equivalent, and skipping it would change ids on text with mojibake, HTML entities or
control characters.
"""
from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from importlib import resources
from typing import Sequence

import numpy as np
import torch

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's pre-tokenization: contractions, runs of letters, single digits, runs of other
# non-space symbols. Whitespace between pieces is dropped.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# ftfy (and the HTML unescaping) only changes text that has non-ASCII characters, ASCII
# control characters or an '&' (entities): printable ASCII plus tab, newline and form feed
# without '&' skips those calls, which dominate the cost on most captions.
# tests/test_tokenizer.py checks this shortcut against the full cleaning on random text.
_FTFY_INERT = re.compile(r"[\t\n\x0c\x20-\x25\x27-\x7e]*")
_WHITESPACE = re.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def default_bpe_path():
    return resources.files("clipforge") / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def load_bpe(path=None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read the merges file and build CLIP's 49,408-entry vocabulary from it."""
    path = path or default_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file (expected {NUM_MERGES} merge lines)")
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy, HTML unescape (twice), strip, collapse whitespace, lower-case."""
    if not _FTFY_INERT.fullmatch(text):
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


class CLIPTokenizer:
    """Callable: ``tokenizer(texts) -> LongTensor [len(texts), context_length]``, zero-padded.

    Every sequence is ``<|startoftext|> ... <|endoftext|>``; a text too long for the context
    is cut so that its last position still holds ``<|endoftext|>``, which is where the text
    tower pools.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path=None):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.context_length = context_length
        self.vocab, merges = load_bpe(bpe_path)
        self.sot_token_id, self.eot_token_id = self.vocab[SOT_TOKEN], self.vocab[EOT_TOKEN]
        self.vocab_size = len(self.vocab)
        bpe = models.BPE(vocab=self.vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                         fuse_unk=False, dropout=None)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # The two markers are whole tokens wherever they appear in the text, as in OpenAI's cache.
        tok.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        """Ids of one cleaned text, without start/end tokens and without truncation."""
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        cleaned = [clean_text(t) for t in texts]
        # encode_batch_fast skips computing character offsets, which ids do not need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(cleaned, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids; start, end and padding are dropped, ``</w>`` becomes a space."""
        keep = [int(i) for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id)]
        pieces = self._tok.decode(keep, skip_special_tokens=True)
        return pieces.replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"tokenize expects strings, got {type(bad).__name__}: {bad!r}")
        n = context_length or self.context_length
        if n < 2:
            raise ValueError(f"context_length must be at least 2, got {n}")
        out = np.zeros((len(texts), n), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        for row, ids in enumerate(self.encode_batch(texts)):
            k = min(len(ids), n - 2)
            out[row, 1 : k + 1] = ids[:k]
            out[row, k + 1] = self.eot_token_id
        return torch.from_numpy(out)


@lru_cache(maxsize=8)
def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> CLIPTokenizer:
    """A shared tokenizer per context length (building one reads the merges file: ~0.3 s)."""
    return CLIPTokenizer(context_length)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """``clipforge.tokenize(texts, context_length=77)``: LongTensor [len(texts), context_length], zero-padded."""
    return get_tokenizer(context_length)(texts)
