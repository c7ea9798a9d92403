"""MacCap: zero-shot captioning by text-only training (Qiu, Ning and He, AAAI 2024, "Mining Fine-Grained
Image-Text Alignment for Zero-Shot Captioning via Text-Only Training"; official code
github.com/Artanic30/MacCap, whose defaults are followed where the paper leaves a choice).

A frozen CLIP; a captioner trained on captions alone, then run on images.

Training (text only). ``t = normalize(CLIP_text(caption))``; K copies of t, each with its own noise
(the paper models the image-text gap of a pair as a zero-mean Gaussian)::

    z_k = normalize(t + n_k),   n_k ~ N(0, sigma^2 I),   k = 1..K          (noise injection; sigma^2 = 0.016)

An aligner (Q learned queries, one transformer decoder layer cross-attending to z_1..z_K, then a
3-layer MLP) turns them into Q prefix embeddings; a causal transformer reads [prefix; caption tokens]
and is trained with next-token cross-entropy on the caption tokens.

Inference (images), sub-region feature aggregation. ``A`` = attention of the vision tower's last layer
(mean over heads, [N, N] over class token and patches); ``h_j`` = the tower's token j after ``ln_post``,
projected to the joint space and normalized; ``v`` = the normalized image embedding::

    P   = the K tokens with the largest class-token attention A[0, j]     (the class token itself may be one)
    r_i = normalize(sum_j softmax(A[i])_j h_j)      for i in P              (a sub-region around token i)
    f_i = v + lambda * r_i                                                  (lambda = 1)

then the same noise injection (variance ``infer_noise_variance``), aligner and decoder. C captions are
decoded from C independent noise draws and **CLIP re-ranking** keeps the one whose CLIP text embedding
has the highest cosine with v.

Simplifications (docs/captioning.md): the paper's decoder is a pretrained language model (OPT-1.3B,
frozen, only the aligner trains); clipforge has none, so a small causal transformer is trained from
scratch together with the aligner, with a vocabulary limited to the BPE tokens of its training texts.
Each candidate is decoded greedily (the official code decodes each noise draw with 4-beam search).
``softmax(A[i])`` is the official code's weighting (a softmax over an attention row that already sums
to 1, so the weights are close to uniform); ``region_weights="attention"`` uses the row itself.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..models import CLIP, load_model, save_model
from ..models.transformer import Transformer
from ..tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

PAD, SOT, EOT = 0, 1, 2  # compact decoder ids; the compact vocabulary maps them to CLIP BPE ids 0, 49406, 49407
CONFIG_FILE, WEIGHTS_FILE, CLIP_DIR = "maccap.json", "decoder.safetensors", "clip"


@dataclass
class MacCapConfig:
    """The decoder's size and MacCap's inference settings (defaults: the official code's where it has one)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    n_queries: int = 8  # aligner queries = prefix length (32 in the official code)
    align_heads: int = 4  # heads of the aligner's decoder layer (embed_dim must divide by it)
    n_features: int = 10  # K: noisy copies in training, sub-regions at inference (train_seq_length = 10)
    noise_variance: float = 0.016  # sigma^2 of the training noise (noise_variance)
    infer_noise_variance: float = 0.016  # sigma^2 at inference (noise_k)
    patch_weight: float = 1.0  # lambda (infer_patch_weight)
    region_weights: str = "softmax"  # softmax | attention
    n_candidates: int = 4  # C noise draws re-ranked by CLIP (contrastive_generation_beam_size = 4)
    max_len: int = 32  # tokens per caption, start and end token included

    def __post_init__(self):
        for name in ("width", "layers", "heads", "n_queries", "align_heads", "n_features", "n_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"MacCapConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"MacCapConfig.width {self.width} must be divisible by heads {self.heads}")
        if self.noise_variance < 0 or self.infer_noise_variance < 0:
            raise ValueError("noise variances must be >= 0 (0 turns the noise injection off)")
        if self.region_weights not in ("softmax", "attention"):
            raise ValueError(f"region_weights must be 'softmax' (official code) or 'attention', "
                             f"got {self.region_weights!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (start and end token), got {self.max_len}")


def noise_injection(x: Tensor, variance: float, generator: torch.Generator | None = None) -> Tensor:
    """``normalize(x + n)``, ``n ~ N(0, variance * I)``: the paper's model of the modality gap; variance 0
    returns ``normalize(x)``."""
    if variance == 0:
        return F.normalize(x, dim=-1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.normalize(x + math.sqrt(variance) * noise, dim=-1)


def last_layer_attention(model: CLIP, images: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens after ``ln_post`` [B, N, width], head-averaged attention of the last vision layer [B, N, N])."""
    visual = model.visual
    if getattr(visual, "num_prefix", 0) != 1:
        raise ValueError("MacCap's sub-region aggregation ranks patches by the class token's attention; this vision "
                         "tower has no class token (SigLIP-style). Use a CLIP with a class token (e.g. tiny, ViT-B-32)")
    captured: dict[str, Tensor] = {}
    last = visual.transformer.blocks[-1]
    handle = last.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    try:
        tokens = visual.forward_tokens(images)
    finally:
        handle.remove()
    x = last.ln_1(captured["x"])
    b, n, c = x.shape
    h = last.attn.heads
    q, k, _ = last.attn.in_proj(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * (c // h) ** -0.5, dim=-1)
    return tokens, attn.mean(1)


def region_features(model: CLIP, images: Tensor, k: int, patch_weight: float = 1.0,
                    weights: str = "softmax") -> tuple[Tensor, Tensor]:
    """(normalized image embedding v [B, d], sub-region features f [B, k, d]); see the module docstring."""
    tokens, attn = last_layer_attention(model, images)
    n = attn.shape[-1]
    if k > n:
        raise ValueError(f"n_features={k} sub-regions asked for, but the image has only {n} tokens; lower n_features")
    v = F.normalize(model.visual.project(model.visual.pool(tokens)), dim=-1)
    h = F.normalize(model.visual.project(tokens), dim=-1)  # every token in the joint space
    top = attn[:, 0].topk(k, dim=-1).indices  # [B, k]
    rows = attn.gather(1, top.unsqueeze(-1).expand(-1, -1, n))  # [B, k, N]
    w = rows.softmax(-1) if weights == "softmax" else rows
    r = F.normalize(w @ h, dim=-1)
    return v, v.unsqueeze(1) + patch_weight * r


class MacCapDecoder(nn.Module):
    """Aligner (learned queries -> one decoder layer over the K features -> MLP) and a causal transformer
    over [prefix; caption]. Token ids are compact: index i stands for the CLIP BPE id ``vocab[i]``."""

    def __init__(self, cfg: MacCapConfig, embed_dim: int, vocab: Sequence[int]):
        super().__init__()
        if embed_dim % cfg.align_heads:
            raise ValueError(f"the CLIP embedding width {embed_dim} must be divisible by align_heads {cfg.align_heads}")
        if len(vocab) < 4 or list(vocab[:3]) != [0, 49406, 49407]:
            raise ValueError("the compact vocabulary starts with pad, start and end (0, 49406, 49407) "
                             "and has at least one word")
        self.cfg = cfg
        self.register_buffer("vocab", torch.tensor(list(vocab), dtype=torch.long), persistent=True)
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, embed_dim) * embed_dim**-0.5)
        self.aligner = nn.TransformerDecoderLayer(embed_dim, cfg.align_heads, dim_feedforward=4 * embed_dim,
                                                  dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.align_proj = nn.Sequential(nn.Linear(embed_dim, cfg.width), nn.ReLU(), nn.Linear(cfg.width, cfg.width),
                                        nn.ReLU(), nn.Linear(cfg.width, cfg.width))
        self.token_embedding = nn.Embedding(len(vocab), cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.n_queries + cfg.max_len, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.transformer.init_weights()
        self.ln_final = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, len(vocab), bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def prefix(self, features: Tensor) -> Tensor:
        """K features [B, K, d] -> Q prefix embeddings [B, Q, width]."""
        q = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        return self.align_proj(self.aligner(q, features))

    def logits(self, prefix: Tensor, ids: Tensor) -> Tensor:
        """Next-token logits [B, L, V] for compact ids [B, L] after the prefix (logit l predicts token l + 1)."""
        qn, n = prefix.shape[1], ids.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"{n} tokens exceed the decoder's max_len {self.cfg.max_len}")
        x = torch.cat([prefix, self.token_embedding(ids)], dim=1) + self.positional_embedding[: qn + n]
        x = self.ln_final(self.transformer(x, is_causal=True))
        return self.head(x[:, qn:])

    def to_compact(self, bpe_ids: Tensor) -> Tensor:
        lut = torch.full((int(max(int(bpe_ids.max()), int(self.vocab.max()))) + 1,), -1, dtype=torch.long)
        lut[self.vocab.cpu()] = torch.arange(len(self.vocab))
        out = lut[bpe_ids.cpu()]
        if (out < 0).any():
            raise ValueError("the texts hold tokens outside the decoder's vocabulary (the BPE tokens of its training "
                             "texts); train the decoder on texts that cover them")
        return out.to(bpe_ids.device)

    @torch.no_grad()
    def greedy(self, prefix: Tensor, max_len: int | None = None) -> Tensor:
        """Compact ids [B, <= max_len]: start token, argmax tokens (never start or pad), end token, then pad."""
        max_len = min(max_len or self.cfg.max_len, self.cfg.max_len)
        b = prefix.shape[0]
        ids = torch.full((b, 1), SOT, dtype=torch.long, device=prefix.device)
        done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
        for _ in range(max_len - 1):
            logits = self.logits(prefix, ids)[:, -1].float()
            logits[:, [PAD, SOT]] = -torch.inf
            nxt = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            done = done | (nxt == EOT)
            if done.all():
                break
        return ids


def caption_loss(decoder: MacCapDecoder, features: Tensor, compact_ids: Tensor) -> Tensor:
    """Next-token cross-entropy of the caption tokens (padding ignored) given the K features."""
    logits = decoder.logits(decoder.prefix(features), compact_ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), compact_ids[:, 1:].reshape(-1),
                           ignore_index=PAD)


@torch.no_grad()
def encode_texts_normalized(model: CLIP, ids: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([F.normalize(model.encode_text(ids[i : i + batch_size]).float(), dim=-1)
                      for i in range(0, len(ids), batch_size)])


class MacCapCaptioner:
    """A frozen CLIP and a trained :class:`MacCapDecoder`; :meth:`caption` runs MacCap's inference."""

    def __init__(self, clip: CLIP, decoder: MacCapDecoder):
        self.clip, self.decoder, self.cfg = clip.eval(), decoder.eval(), decoder.cfg
        self.tokenizer = get_tokenizer(clip.context_length)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    def decode(self, compact_ids: Tensor) -> list[str]:
        bpe = self.decoder.vocab.to(compact_ids.device)[compact_ids]
        return [self.tokenizer.decode(row.tolist()) for row in bpe]

    @torch.no_grad()
    def candidates(self, images: Tensor, generator: torch.Generator | None = None,
                   max_len: int | None = None) -> tuple[Tensor, list[list[str]]]:
        """(normalized image embeddings [B, d], C candidate captions per image from C noise draws)."""
        c = self.cfg
        v, feats = region_features(self.clip, images, c.n_features, c.patch_weight, c.region_weights)
        per_draw = [self.decode(self.decoder.greedy(self.decoder.prefix(
            noise_injection(feats, c.infer_noise_variance, generator)), max_len)) for _ in range(c.n_candidates)]
        return v, [[draw[i] for draw in per_draw] for i in range(images.shape[0])]

    @torch.no_grad()
    def caption(self, images: Tensor, generator: torch.Generator | None = None,
                max_len: int | None = None) -> list[dict]:
        """One record per image: ``caption`` (the re-ranked best), ``clip_cosine`` and all ``candidates``."""
        v, cands = self.candidates(images, generator, max_len)
        out = []
        for i, texts in enumerate(cands):
            t = encode_texts_normalized(self.clip, self.tokenizer(texts))
            sims = t @ v[i]
            best = int(sims.argmax())
            out.append({"caption": texts[best], "clip_cosine": float(sims[best]), "candidates": texts})
        return out

    def save(self, directory: str | Path) -> Path:
        """``maccap.json`` (config, compact vocabulary), ``decoder.safetensors`` and the CLIP under ``clip/``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.clip, directory / CLIP_DIR)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.decoder.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        meta = {"method": "maccap", "config": asdict(self.cfg), "embed_dim": self.decoder.queries.shape[1],
                "vocab": self.decoder.vocab.tolist()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MacCapCaptioner:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise FileNotFoundError(f"'{directory}' is not a MacCap decoder directory (no {CONFIG_FILE}); "
                                    "write one with "
                                    "clipforge.captioning.train_maccap(...).save(DIR)")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        decoder = MacCapDecoder(MacCapConfig(**meta["config"]), meta["embed_dim"], meta["vocab"])
        decoder.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return cls(load_model(directory / CLIP_DIR), decoder)


def is_maccap_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def train_maccap(clip: CLIP, texts: Sequence[str], cfg: MacCapConfig | None = None, *, steps: int = 1000,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0, max_seconds: float | None = None,
                 log_every: int = 50) -> tuple[MacCapCaptioner, list[dict]]:
    """Train a MacCap decoder on ``texts`` only (the CLIP stays frozen). Stops after ``steps`` or
    ``max_seconds`` of training, whichever comes first. Returns the captioner and the loss history."""
    cfg = cfg or MacCapConfig()
    if not texts:
        raise ValueError("train_maccap needs at least one training text")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    clip = clip.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    tok = get_tokenizer(clip.context_length)
    ids = tok(list(texts))
    text_features = encode_texts_normalized(clip, ids)
    dec_ids = ids[:, : cfg.max_len].clone()
    dec_ids[:, -1] = torch.where(dec_ids[:, -1] != 0, torch.full_like(dec_ids[:, -1], 49407), dec_ids[:, -1])
    vocab = [0, 49406, 49407] + sorted(set(dec_ids.unique().tolist()) - {0, 49406, 49407})
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(seed)
        decoder = MacCapDecoder(cfg, text_features.shape[1], vocab)
    compact = decoder.to_compact(dec_ids)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    history, t0 = [], time.perf_counter()
    decoder.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(texts), (batch_size,), generator=gen)
        z = noise_injection(text_features[idx].unsqueeze(1).expand(-1, cfg.n_features, -1), cfg.noise_variance, gen)
        loss = caption_loss(decoder, z, compact[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        elapsed, loss = time.perf_counter() - t0, loss.detach()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": float(loss), "seconds": round(elapsed, 2)})
            logger.info("maccap step %d loss %.4f (%.0f s)", step, float(loss), elapsed)
        if max_seconds is not None and elapsed >= max_seconds:
            history.append({"step": step, "loss": float(loss), "seconds": round(elapsed, 2)})
            break
    return MacCapCaptioner(clip, decoder.eval()), history
