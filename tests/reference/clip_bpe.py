"""A plain-Python CLIP BPE tokenizer, written from the algorithm of OpenAI's original
``simple_tokenizer.py``: the reference that clipforge's tokenizer must agree with, and the
"pure-Python BPE loop" baseline of benchmarks/bench_tokenizer.py.

It shares no code with ``clipforge.tokenizer``: the byte map, vocabulary layout, cleaning,
regex split and greedy lowest-rank merging are all re-derived here.
"""
from __future__ import annotations

import gzip
import html

import ftfy
import regex

PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def byte_map() -> dict[int, str]:
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


class NaiveCLIPBPE:
    def __init__(self, path: str):
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(l.split()) for l in lines]
        self.byte_encoder = byte_map()
        base = list(self.byte_encoder.values())  # printable bytes first, then the remapped ones
        words = base + [w + "</w>" for w in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {w: i for i, w in enumerate(words)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in regex.findall(PATTERN, text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def tokenize(self, texts: list[str], context_length: int = 77) -> list[list[int]]:
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        rows = []
        for t in texts:
            ids = [sot] + self.encode(t) + [eot]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = eot
            rows.append(ids + [0] * (context_length - len(ids)))
        return rows
