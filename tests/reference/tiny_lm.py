"""A tiny random causal language model (Llama architecture) and a word-level tokenizer, written to a
directory as a Hugging Face model: the offline stand-in for a pretrained LM in the LLM2CLIP tests."""
from __future__ import annotations

from pathlib import Path

WORDS = ("a an the one two three four of and on left right top bottom small large big picture photo colored "
         "red green blue yellow purple orange white black gray circle square triangle star hexagon cross "
         "circles squares triangles stars hexagons crosses above below next to is there this . , in").split()


def make_tiny_lm(directory: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(str(directory))
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1,
                      eos_token_id=2, bos_token_id=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(str(directory))
    return directory
