"""Tokenizers for loaded models that do not use CLIP's BPE (SigLIP's SentencePiece, BERT's WordPiece).

:class:`HFTokenizer` wraps the tokenizer files shipped in a model directory (through
transformers' ``AutoTokenizer``) behind clipforge's interface: ``tokenizer(texts)`` gives a
LongTensor ``[len(texts), context_length]`` padded to the full context, the way SigLIP was
trained (``padding="max_length"``). :class:`MissingTokenizer` stands in when a directory ships
no tokenizer files: the model still loads, and calling it says what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt", "vocab.json")


def has_tokenizer_files(directory: str | Path) -> bool:
    return any((Path(directory) / f).exists() for f in TOKENIZER_FILES)


class HFTokenizer:
    def __init__(self, directory: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.directory = str(directory)
        self.context_length = context_length
        self._tok = AutoTokenizer.from_pretrained(self.directory)
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = self._tok(list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
        return out["input_ids"].long()


class MissingTokenizer:
    def __init__(self, directory: str | Path, reason: str):
        self.directory, self.reason = str(directory), reason

    def __call__(self, *args, **kwargs):
        raise FileNotFoundError(
            f"no tokenizer for the model loaded from '{self.directory}': {self.reason}. Copy the model's tokenizer "
            "files "
            f"({', '.join(TOKENIZER_FILES)}) into that directory, or tokenize yourself and pass ids to "
            "model.encode_text"
        )
