"""Tokenizers for loaded models that do not use CLIP's BPE (SigLIP's SentencePiece, BERT's WordPiece).

:class:`HFTokenizer` wraps the tokenizer files shipped in a model directory (through
transformers' ``AutoTokenizer``) behind clipforge's interface: ``tokenizer(texts)`` gives a
LongTensor ``[len(texts), context_length]`` padded to the full context, the way SigLIP was
trained (``padding="max_length"``). :class:`MissingTokenizer` stands in when a directory ships
no tokenizer files: the model still loads, and calling it says what is missing.
:class:`CausalLMTokenizer` tokenizes for a causal language model's text tower (LLM2CLIP,
:mod:`clipforge.models.llm_text`): each text ends with the LM's end-of-sequence token, which the tower pools on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, MissingInputError

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


class CausalLMTokenizer:
    """A causal LM's tokenizer (``directory``, or the GGUF file ``gguf_file`` in it) behind clipforge's interface:
    ``tokenizer(texts)`` -> LongTensor [len(texts), context_length], each row the text's tokens (cut to
    ``context_length - 1``), the end-of-sequence token, then padding (the pad token, or the end token when the
    tokenizer has none; the tower reads up to the first end token)."""

    def __init__(self, directory: str | Path, context_length: int, gguf_file: str | None = None):
        from transformers import AutoTokenizer

        self.directory, self.context_length = str(directory), context_length
        if gguf_file is None and not has_tokenizer_files(directory):
            raise MissingInputError(f"the causal language model at '{directory}' has no tokenizer files "
                                    f"({', '.join(TOKENIZER_FILES)}); copy its tokenizer there (clipforge "
                                    "lm-finetune writes one beside the weights)")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self._tok = AutoTokenizer.from_pretrained(self.directory, **kwargs)
        if self._tok.eos_token_id is None:
            raise ConfigError(f"the tokenizer at '{directory}' has no end-of-sequence token, which the LM text tower "
                              "pools on; use a causal LM tokenizer that defines eos_token")
        self.eos_token_id = int(self._tok.eos_token_id)
        pad = self._tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        rows = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        out = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            row = list(row[: n - 1]) + [self.eos_token_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files into ``directory`` (beside a saved model)."""
        self._tok.save_pretrained(str(directory))


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
