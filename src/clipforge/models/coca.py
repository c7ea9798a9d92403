"""CoCa: a CLIP dual encoder plus a captioning decoder (Yu et al., 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models"), laid out as OpenCLIP's CoCa.

    image  -> ViT tokens V -> pool (class token / one-query attention) -> x    (contrastive image embedding)
                           -> attentional pooler, n_queries learned queries -> I [B, Q, w]
    tokens -> unimodal causal text transformer -> states H [B, L, w] -> state at EOT -> y   (contrastive text embedding)
    H[:, :-1], I -> multimodal decoder (per layer: causal self-attention block, then a
                    cross-attention block to I) -> ln -> linear to the vocabulary -> logits [B, L-1, V]

The loss is CoCa's Eq. (4), ``L = lambda_con * L_con + lambda_cap * L_cap``: ``L_con`` the CLIP loss
of x and y, ``L_cap = -sum_l log P(t_{l+1} | I, t_{<=l})`` the next-token cross-entropy
(:mod:`clipforge.losses.caption`); the paper's weights are lambda_con = 1, lambda_cap = 2, i.e.
``loss={clip: 1.0, caption: 2.0}``. The unimodal text tower is the CLIP text tower unchanged
(causal, so its states for positions <= l never see tokens > l, and the decoder's logit at l
depends only on the image and tokens <= l). OpenCLIP appends a learned CLS token to the text for
the contrastive embedding; the end-of-text state here plays that role (with the causal mask it too
has read the whole caption). The paper pools the contrastive image embedding with a one-query
attentional pooler: ``vision.pool="attn"``; ``coca-tiny`` keeps the class token so that it differs
from the ``tiny`` CLIP only by the decoder.

``forward(images, texts)`` returns the CLIP outputs plus ``caption_logits`` [B, n-1, V] and
``caption_targets`` [B, n-1] (= ``texts[:, 1:n]``, pad 0 ignored by the loss), where n is the
batch's longest caption with start and end token: the positions after it predict only padding,
which the loss ignores, so they are not computed. ``generate(images, max_len)`` decodes
greedily or with beam search.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .clip import CLIP
from .config import CLIPConfig
from .text import TextTransformer
from .transformer import Block, attention_context, make_act

SOT_TOKEN_ID = 49406  # <start_of_text> of CLIP's BPE vocabulary


@dataclass
class MultimodalConfig:
    """The captioning half of CoCa; its width is the text tower's (it reads the text tower's states)."""

    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-5
    n_queries: int = 256  # attentional pooler queries: the image tokens the decoder attends to (256 in the paper)
    pool_heads: int = 8

    def __post_init__(self):
        if self.layers < 1 or self.n_queries < 1:
            raise ValueError(f"multimodal layers and n_queries must be >= 1, got {self.layers} and {self.n_queries}")


@dataclass
class TgmimConfig:
    """SyCoCa's text-guided masked image modeling branch (see :class:`TextGuidedMIM`)."""

    mask_ratio: float = 0.5  # fraction of the patches masked and reconstructed
    layers: int = 1  # decoder layers (self-attention block, then cross-attention to the caption's states)
    attentive: bool = True  # mask the patches the caption attends to most; False: a random subset (the ablation)

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"tgmim mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.layers < 1:
            raise ValueError(f"tgmim layers must be >= 1, got {self.layers}")


@dataclass
class CoCaConfig(CLIPConfig):
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    tgmim: TgmimConfig | None = None  # SyCoCa's TG-MIM branch; the sycoca_tgmim loss term switches it on

    def __post_init__(self):
        if self.hf_text is not None:
            raise ValueError("CoCa's decoder reads clipforge's own causal text transformer; hf_text is not supported")
        if not self.text.causal:
            raise ValueError("CoCa needs a causal text tower (text.causal=true): the decoder predicts the next token")
        if self.text.width % self.multimodal.heads or self.text.width % self.multimodal.pool_heads:
            raise ValueError(f"text width {self.text.width} must be divisible by multimodal heads "
                             f"{self.multimodal.heads} and pool_heads {self.multimodal.pool_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoCaConfig:
        d = dict(d)
        if isinstance(d.get("tgmim"), bool):  # tgmim: true turns SyCoCa's branch on with its defaults
            d["tgmim"] = TgmimConfig() if d["tgmim"] else None
        return cls.variant_from_dict(d, {"multimodal": MultimodalConfig, "tgmim": TgmimConfig})


class AttentionalPooler(nn.Module):
    """n learned queries attend to the (normalized) image tokens: OpenCLIP's AttentionalPooler."""

    def __init__(self, d_model: int, context_dim: int, heads: int, n_queries: int, ln_eps: float = 1e-5):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model, eps=ln_eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=ln_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a context; one fused ``in_proj`` (q | k | v rows) as in
    torch's MultiheadAttention (OpenCLIP's layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, c = x.shape
        m, h = context.shape[1], self.heads
        w, bias = self.in_proj.weight, self.in_proj.bias
        q = F.linear(x, w[:c], bias[:c]).view(b, n, h, c // h).transpose(1, 2)
        kv = F.linear(context, w[c:], bias[c:]).view(b, m, 2, h, c // h).permute(2, 0, 3, 1, 4)
        with attention_context(x):
            out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CrossBlock(nn.Module):
    """x + xattn(ln_1(x), ln_1_kv(I)); x + mlp(ln_2(x)) (OpenCLIP's cross-attention residual block)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float = 1e-5):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.ln_1_kv = nn.LayerNorm(width, eps=ln_eps)
        self.attn = CrossAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), make_act(act), nn.Linear(hidden, width))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_1_kv(context))
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """Causal self-attention block then cross-attention block, per layer; ln_final; vocabulary head."""

    def __init__(self, width: int, cfg: MultimodalConfig, vocab_size: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps) for _ in range(cfg.layers)]
        )
        self.cross = nn.ModuleList([CrossBlock(width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
                                    for _ in range(cfg.layers)])
        self.ln_final = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.head = nn.Linear(width, vocab_size, bias=False)
        # OpenCLIP's MultimodalTransformer initialization
        proj_std, attn_std, fc_std = width**-0.5 * (2 * cfg.layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in [*self.blocks, *self.cross]:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
        nn.init.normal_(self.head.weight, std=width**-0.5)
        self.grad_checkpointing = False  # recompute each layer's activations in backward (non-reentrant)

    def _layer(self, x: Tensor, image_tokens: Tensor, k: int) -> Tensor:
        return self.cross[k](self.blocks[k](x, is_causal=True), image_tokens.to(x.dtype))

    def forward(self, text_states: Tensor, image_tokens: Tensor) -> Tensor:
        x = text_states
        for k in range(len(self.blocks)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, x, image_tokens, k, use_reentrant=False)
            else:
                x = self._layer(x, image_tokens, k)
        return self.head(self.ln_final(x))


class TextGuidedMIM(nn.Module):
    """SyCoCa's TG-MIM head ("SyCoCa: Symmetrizing Contrastive Captioners with Attentive Masking for
    Multimodal Alignment", 2024, Sec. 3): reconstruct masked image patches from the visible ones and the
    caption.

    Attentive masking: with y the caption's contrastive embedding and p_k the projected patch tokens of
    the full image, the text-to-patch attention is alpha = softmax_k(y . p_k / sqrt(d)); the
    ``round(mask_ratio * N)`` patches of highest alpha (the patches the caption is about) are masked
    (``attentive=False``: a random subset). The image tower encodes the visible patches only; the
    decoder places them (linearly mapped to the text width) and a learned mask token at the masked
    positions, adds its own position embedding, runs ``layers`` x (self-attention block, cross-attention
    block to the caption's token states) and maps each masked position to its patch's pixels. The target
    is the patch's pixels normalized per patch (MAE's normalized-pixel target); the loss term
    ``sycoca_tgmim`` is their mean squared error.

    Simplifications, stated: the contrastive and captioning heads still see the full image (the masked
    pass is an extra pass of the image tower on the visible patches); the attention is the contrastive
    embeddings' dot product, not a learned cross-attention map; the decoder is ``layers`` CoCa decoder
    layers without the causal mask."""

    def __init__(self, vision_width: int, width: int, heads: int, patch_pixels: int, positions: int,
                 cfg: TgmimConfig, mlp_ratio: float, act: str, ln_eps: float):
        super().__init__()
        self.cfg = cfg
        self.visible_in = nn.Linear(vision_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.randn(positions, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act, ln_eps) for _ in range(cfg.layers)])
        self.cross = nn.ModuleList([CrossBlock(width, heads, mlp_ratio, act, ln_eps) for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.out = nn.Linear(width, patch_pixels)

    def forward(self, visible: Tensor, keep: Tensor, masked: Tensor, text_states: Tensor) -> Tensor:
        """Predicted pixels [B, M, patch_pixels] of the masked patches (indices ``masked`` [B, M]) from the
        encoded visible patches [B, K, vision_width] (indices ``keep`` [B, K]) and the caption's states."""
        b, k = keep.shape
        n = k + masked.shape[1]
        src = self.visible_in(visible)  # under autocast a lower precision than the visible tokens
        x = self.mask_token.to(src.dtype).expand(b, n, -1).clone()
        x = x.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), src)
        x = x + self.pos.to(x.dtype)
        for block, cross in zip(self.blocks, self.cross):
            x = cross(block(x), text_states.to(x.dtype))
        x = self.ln(x).gather(1, masked[..., None].expand(-1, -1, x.shape[-1]))
        return self.out(x)


def patch_pixels(images: Tensor, patch: int) -> Tensor:
    """[B, 3, S, S] -> [B, N, 3 * patch * patch] row-major patches, channel-major inside a patch (the order
    of the image tower's patch embedding)."""
    b, _, s, _ = images.shape
    g = s // patch
    return images.reshape(b, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * patch * patch)


class CoCa(CLIP):
    """CLIP + attentional pooler + multimodal decoder; see the module docstring. With ``cfg.tgmim`` set
    (SyCoCa), ``forward(images, texts)`` also returns ``tgmim_pred`` and ``tgmim_target`` [B, M, 3 p^2]
    (:class:`TextGuidedMIM`) and ``tgmim_masked`` [B, M], the masked patch indices."""

    extra_outputs = ("caption_logits", "caption_targets")  # what forward adds for the loss terms

    def __init__(self, cfg: CoCaConfig):
        super().__init__(cfg)
        if not isinstance(self.text, TextTransformer):
            raise ValueError("CoCa needs clipforge's text transformer")
        w, mm = cfg.text.width, cfg.multimodal
        self.attn_pool_caption = AttentionalPooler(w, cfg.vision.width, mm.pool_heads, mm.n_queries, mm.ln_eps)
        self.ln_caption = nn.LayerNorm(w, eps=mm.ln_eps)
        self.decoder = MultimodalDecoder(w, mm, cfg.text.vocab_size)
        self.tgmim = None
        if cfg.tgmim is not None:
            p = cfg.vision.patch_size
            self.tgmim = TextGuidedMIM(cfg.vision.width, w, mm.heads, 3 * p * p, self.visual.grid ** 2, cfg.tgmim,
                                       mm.mlp_ratio, mm.act, mm.ln_eps)
            self.extra_outputs = (*CoCa.extra_outputs, "tgmim_pred", "tgmim_target", "tgmim_masked")

    def tgmim_outputs(self, images: Tensor, tokens: Tensor, text_embedding: Tensor, states: Tensor,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The TG-MIM branch (:class:`TextGuidedMIM`) for images whose full-image tower tokens are ``tokens``
        and whose captions have the unnormalized contrastive embedding ``text_embedding`` [B, d] and token
        states ``states`` [B, L, w]."""
        if self.tgmim is None:
            raise ValueError("this CoCa has no TG-MIM branch; build it with tgmim=true "
                             "(model_overrides.tgmim=true, or the sycoca_tgmim loss term)")
        vis, cfg = self.visual, self.tgmim.cfg
        n = vis.grid ** 2
        m = min(max(1, round(cfg.mask_ratio * n)), n - 1)
        with torch.no_grad():
            if cfg.attentive:
                patches = F.normalize(vis.project(tokens[:, vis.num_prefix:]).float(), dim=-1)
                y = F.normalize(text_embedding.float(), dim=-1)
                score = torch.einsum("bd,bnd->bn", y, patches)  # softmax is monotone: rank by the logits
            else:
                score = torch.rand(images.shape[0], n, device=images.device, generator=generator)
            order = score.argsort(dim=1, descending=True)
            masked, keep = order[:, :m].sort(dim=1).values, order[:, m:].sort(dim=1).values
        x = vis.embed_patches(images) + vis.positional_embedding[vis.num_prefix:].to(images.dtype)
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        if vis.class_embedding is not None:
            cls = (vis.class_embedding + vis.positional_embedding[0]).to(x.dtype)
            x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1)
        visible = vis.ln_post(vis.transformer(vis.ln_pre(x)))[:, vis.num_prefix:]
        pred = self.tgmim(visible, keep, masked, states)
        target = patch_pixels(images, self.cfg.vision.patch_size).gather(1, masked[..., None].expand(-1, -1,
                                                                                                   pred.shape[-1]))
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return {"tgmim_pred": pred, "tgmim_target": target.detach(), "tgmim_masked": masked}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Both towers' blocks and the multimodal decoder's layers recompute their activations in backward."""
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def image_and_caption_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(unnormalized contrastive image embedding [B, d], pooled image tokens for the decoder [B, Q, w])."""
        tokens = self.visual.forward_tokens(images)
        pooled = self.visual.pool(tokens)
        return self.visual.project(pooled), self.ln_caption(self.attn_pool_caption(tokens))

    def _text_embedding(self, states: Tensor, ids: Tensor) -> Tensor:
        return self.text.project(self.text.pool(states, ids))

    def caption_logits(self, caption_tokens: Tensor, ids: Tensor) -> Tensor:
        """Next-token logits [B, L, V] for token ids [B, L] (logit l predicts token l + 1)."""
        return self.decoder(self.text.forward_tokens(ids), caption_tokens)

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None) -> dict[str, Tensor | None]:
        if images is None or texts is None:
            return super().forward(images, texts)
        tokens = self.visual.forward_tokens(images)
        img = self.visual.project(self.visual.pool(tokens))
        caption_tokens = self.ln_caption(self.attn_pool_caption(tokens))
        states = self.text.forward_tokens(texts)
        text = self._text_embedding(states, texts)
        n = max(int(self.text.eot_index(texts).max()) + 1, 2)  # longest caption: later targets are all padding
        out = {
            "image_features": F.normalize(img, dim=-1),
            "text_features": F.normalize(text, dim=-1),
            "logit_scale": self.scale(),
            "logit_bias": self.logit_bias,
            "caption_logits": self.decoder(states[:, : n - 1], caption_tokens),
            "caption_targets": texts[:, 1:n],
        }
        if self.tgmim is not None:
            out.update(self.tgmim_outputs(images, tokens, text, states))
        return out

    @torch.no_grad()
    def generate(self, images: Tensor, max_len: int | None = None, num_beams: int = 1, sot_token_id: int = SOT_TOKEN_ID,
                 length_penalty: float = 1.0) -> Tensor:
        """Captions [B, <= max_len] as token ids: start token, generated tokens, end token, then padding (0).

        ``num_beams=1`` decodes greedily; more keeps that many hypotheses per image and returns the one
        with the highest sum of token log-probabilities divided by (generated length) ** ``length_penalty``.
        Decoding stops at the end token (or ``max_len``, at most the context length, tokens in all)."""
        max_len = min(max_len or self.context_length, self.context_length)
        if max_len < 2 or num_beams < 1:
            raise ValueError(f"generate needs max_len >= 2 and num_beams >= 1, got {max_len} and {num_beams}")
        eot, pad = self.cfg.text.eot_token_id, self.cfg.text.pad_token_id
        _, memory = self.image_and_caption_tokens(images)
        b, k = images.shape[0], num_beams
        memory = memory.repeat_interleave(k, dim=0)
        ids = torch.full((b * k, 1), sot_token_id, dtype=torch.long, device=images.device)
        scores = torch.zeros(b, k, device=images.device)
        scores[:, 1:] = -torch.inf  # all beams start as the same hypothesis: expand only the first
        done = torch.zeros(b * k, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            logp = self.caption_logits(memory, ids)[:, -1].float()
            logp[:, [sot_token_id, pad]] = -torch.inf  # no second start token; padding only after the end
            logp = logp.log_softmax(-1)
            # a finished hypothesis only extends with padding, at no cost
            logp[done] = -torch.inf
            logp[done, pad] = 0.0
            v = logp.shape[-1]
            cand = (scores.view(-1, 1) + logp).view(b, k * v)
            scores, flat = cand.topk(k, dim=-1)
            beam, token = flat // v, flat % v
            rows = (torch.arange(b, device=ids.device)[:, None] * k + beam).view(-1)
            ids = torch.cat([ids[rows], token.view(-1, 1)], dim=1)
            done = done[rows] | (token.view(-1) == eot)
            if done.all():
                break
        length = ((ids != pad) & (ids != sot_token_id)).sum(1).clamp(min=1).view(b, k).float()
        best = (scores / length**length_penalty).argmax(-1) if k > 1 else torch.zeros(b, dtype=torch.long)
        out = ids.view(b, k, -1)[torch.arange(b), best.to(ids.device)]
        keep = int((out != pad).any(0).nonzero().max()) + 1  # drop columns that are padding in every caption
        return out[:, :keep]
