"""MobileCLIP's towers (Vasu et al., 2024, "MobileCLIP: Fast Image-Text Models through Multi-Modal
Reinforced Training"): the MCi image encoder and the MCt text encoder, with structural
reparameterization (RepVGG / MobileOne / FastViT) folding the multi-branch training form into
single convolutions for inference.

MCi (the paper's image tower, a FastViT variant), on images [B, 3, S, S]:

    stem: MobileOne 3x3/2 (3 -> d0), MobileOne depthwise 3x3/2, MobileOne 1x1     -> [B, d0, S/4, S/4]
    stage i (i = 0..3), ``layers[i]`` blocks of width d_i, then (i < 3) a downsampling patch embedding
        (reparameterizable large-kernel depthwise 7x7/2 conv d_i -> d_{i+1} with a 3x3 branch, GELU,
        then MobileOne 1x1):
      RepMixer block:  x = x + s * (BN(DWConv_k(x)) + BN(Conv_1(x)) + BN(x) - BN'(x))   (token mixing, Eq. of
                       FastViT's RepMixer: mixer(x) - norm(x) with layer scale s)
                       x = x + s' * ConvFFN(x)
      attention block: stage input x = x + DWConv_7(x) (RepCPE, conditional positional encoding), then per block
                       x = x + s1 * MHSA(BN(x)); x = x + s2 * ConvFFN(x)
      ConvFFN(x) = fc2(GELU(fc1(BN(DWConv_7(x)))))  (1x1 convolutions fc1/fc2)
    head: MobileOne depthwise 3x3 (d3 -> exp_ratio * d3), global average pool, linear projection.

MCt (the paper's text tower; in the official code ``mct``): token + positional embedding, one RepMixer block
over the sequence (a depthwise (1 x 11) convolution on [B, D, 1, L], and a ConvFFN with a (1 x 11) depthwise
convolution), ``text.layers`` pre-LN transformer blocks, a second RepMixer block, LayerNorm, the state of the
end-of-text token, projection. As in the official ``mct`` (causal_masking false) the text tower is
bidirectional and attends to the padding, so an embedding depends on the padded length; clipforge
tokenizes to the model's context length, as the official code does.

Structural reparameterization. In evaluation mode every BatchNorm is an affine map, so a conv-BN branch
is the convolution with kernel ``W * gamma / sigma`` and bias ``beta - mu * gamma / sigma``
(sigma = sqrt(running_var + eps)); an identity (BN-only) branch is the same with the identity kernel (a 1
at the kernel centre of each channel); a 1x1 branch is zero-padded to the kernel size; parallel branches
add. :func:`reparameterize` returns a copy in which every MobileOne block, large-kernel conv, RepMixer
(``x + s * (mixer(x) - norm(x))`` folds to one depthwise conv: identity + s * (W_mixer - W_norm)), RepCPE
(``x + pe(x)``: identity + W_pe) and ConvFFN's conv-BN is one convolution with a bias; its outputs equal the
training form's in evaluation mode (tests/models/test_mobileclip.py::test_reparameterized_equals_training_form
checks it in float64). The config records ``reparameterized: true`` so that :func:`~clipforge.models.load_model`
rebuilds the folded layout; reparameterizing twice is an error.

Simplifications (say so wherever a number is quoted): MCi's head MobileOne block has no squeeze-excite
unit (the official conv_exp uses SE); MobileOne blocks have one conv branch (the official MCi setting,
num_conv_branches=1); attention uses PyTorch's scaled_dot_product_attention with heads of ``head_dim``
(32, as MCi) and no qkv bias; no drop-path. ``vision`` in the config is read only for ``image_size``
(the MCi architecture is the ``mci`` section). Sizes: ``mobileclip-s0`` has MCi0's stages
(layers 2-6-10-2, widths 64-128-256-512, 256 px) and the S0 text tower (width 512, 4 transformer layers
between two RepMixer blocks, 8 heads); ``mobileclip-tiny`` is a CPU-sized version.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIP
from .config import CLIPConfig, TextConfig
from .transformer import Transformer, attention_context

ALREADY = ("this module is already reparameterized: its multi-branch training form was folded into one "
           "convolution. Reparameterize the training-form model (the checkpoint before clipforge.models."
           "mobileclip.reparameterize) instead")


@dataclass
class MCiConfig:
    """The MCi image tower; the image size is ``vision.image_size`` of the enclosing config."""

    layers: tuple[int, ...] = (2, 6, 10, 2)
    dims: tuple[int, ...] = (64, 128, 256, 512)
    token_mixers: tuple[Literal["repmixer", "attention"], ...] = ("repmixer", "repmixer", "repmixer", "attention")
    mlp_ratio: float = 3.0
    repmixer_kernel: int = 3
    ffn_kernel: int = 7
    down_kernel: int = 7  # large-kernel depthwise conv of the downsampling patch embedding
    cpe_kernel: int = 7
    head_dim: int = 32
    exp_ratio: float = 2.0  # head conv widens d_last -> exp_ratio * d_last before pooling
    layer_scale_init: float = 1e-5

    def __post_init__(self):
        self.layers, self.dims, self.token_mixers = tuple(self.layers), tuple(self.dims), tuple(self.token_mixers)
        if not (len(self.layers) == len(self.dims) == len(self.token_mixers) >= 1):
            raise ValueError(f"mci.layers, mci.dims and mci.token_mixers need one entry per stage, got "
                             f"{len(self.layers)}, {len(self.dims)} and {len(self.token_mixers)}")
        for a, b in zip(self.dims, self.dims[1:]):
            if b % a:
                raise ValueError(f"mci.dims: each width must be a multiple of the one before (the downsampling conv "
                                 f"is depthwise over the input channels), got {a} -> {b}")
        for d, mixer in zip(self.dims, self.token_mixers):
            if mixer not in ("repmixer", "attention"):
                raise ValueError(f"mci.token_mixers: unknown mixer '{mixer}'; use 'repmixer' or 'attention'")
            if mixer == "attention" and d % self.head_dim:
                raise ValueError(f"mci: attention stage width {d} is not divisible by head_dim {self.head_dim}")
        for name in ("repmixer_kernel", "ffn_kernel", "down_kernel", "cpe_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"mci.{name} must be odd (same-size padding), got {getattr(self, name)}")


@dataclass
class MCtConfig:
    """The RepMixer blocks around MCt's transformer layers (their number and width are ``text``'s)."""

    kernel: int = 11
    mlp_ratio: float = 4.0
    blocks_first: int = 1  # RepMixer blocks before the transformer layers
    blocks_last: int = 1  # and after them
    layer_scale_init: float = 1e-5

    def __post_init__(self):
        if self.kernel % 2 == 0 or self.blocks_first < 0 or self.blocks_last < 0:
            raise ValueError(f"mct: kernel must be odd and block counts >= 0, got kernel={self.kernel}, "
                             f"blocks_first={self.blocks_first}, blocks_last={self.blocks_last}")


@dataclass
class MobileCLIPConfig(CLIPConfig):
    mci: MCiConfig = field(default_factory=MCiConfig)
    mct: MCtConfig = field(default_factory=MCtConfig)
    reparameterized: bool = False  # the folded inference layout (written by reparameterize)

    def __post_init__(self):
        if self.hf_text is not None:
            raise ValueError("MobileCLIP has its own MCt text tower; remove hf_text from the config")
        if self.text.causal or self.text.pool != "eot":
            raise ValueError("MCt is bidirectional and pools the end-of-text token: set text.causal=false and "
                             "text.pool='eot'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MobileCLIPConfig:
        return cls.variant_from_dict(d, {"mci": MCiConfig, "mct": MCtConfig, "reparameterized": bool},
                                     text_defaults={"causal": False, "pad_mask": False})


# ---- folding helpers -------------------------------------------------------------------------------------------

def _pair(k) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else tuple(k)


def identity_kernel(channels: int, groups: int, kernel: tuple[int, int], like: Tensor) -> Tensor:
    """The kernel [C, C/groups, kh, kw] of the identity map: 1 at the centre of each channel's own input."""
    per = channels // groups
    w = torch.zeros(channels, per, *kernel, dtype=like.dtype, device=like.device)
    w[torch.arange(channels), torch.arange(channels) % per, kernel[0] // 2, kernel[1] // 2] = 1
    return w


def fuse_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of ``bn(conv(x))`` as one convolution, with BN in evaluation mode."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def _pad_to(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    dh, dw = (size[0] - kernel.shape[2]) // 2, (size[1] - kernel.shape[3]) // 2
    return F.pad(kernel, [dw, dw, dh, dh])


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride: int, groups: int):
        kernel = _pair(kernel)
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, (kernel[0] // 2, kernel[1] // 2), groups=groups,
                                          bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def folded(self) -> tuple[Tensor, Tensor]:
        return fuse_bn(self.conv.weight, self.bn)


class Reparameterizable(nn.Module):
    """A module with a training form and one folded convolution ``self.reparam`` for inference."""

    reparam: nn.Conv2d | None

    def folded(self) -> tuple[Tensor, Tensor]:  # (kernel, bias) of the whole training form
        raise NotImplementedError

    def _conv(self, cin: int, cout: int, kernel, stride: int, groups: int) -> nn.Conv2d:
        kernel = _pair(kernel)
        return nn.Conv2d(cin, cout, kernel, stride, (kernel[0] // 2, kernel[1] // 2), groups=groups, bias=True)

    def reparameterize(self) -> None:
        """Fold the branches into ``self.reparam`` and drop them (in place)."""
        if self.reparam is not None:
            raise ValueError(ALREADY)
        with torch.no_grad():
            w, b = self.folded()
            conv = self._conv(*self.conv_args())
            conv = conv.to(device=w.device, dtype=w.dtype)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        self.drop_branches()
        self.reparam = conv

    def conv_args(self) -> tuple:
        raise NotImplementedError

    def drop_branches(self) -> None:
        raise NotImplementedError


class MobileOneBlock(Reparameterizable):
    """act(sum of branches): conv-BN (kernel k), a 1x1 conv-BN ("scale", when k > 1) and a BN identity
    ("skip", when the shape is kept); MobileOne (Vasu et al., 2023) with one conv branch."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, groups: int = 1, act: bool = True,
                 conv_branch: bool = True, scale_branch: bool = True):
        super().__init__()
        self.args = (cin, cout, _pair(kernel), stride, groups)
        k = _pair(kernel)
        self.conv = ConvBN(cin, cout, k, stride, groups) if conv_branch else None
        self.scale = ConvBN(cin, cout, 1, stride, groups) if scale_branch and k != (1, 1) else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.GELU() if act else nn.Identity()
        self.reparam = None

    def conv_args(self) -> tuple:
        return self.args

    def folded(self) -> tuple[Tensor, Tensor]:
        cin, cout, k, _, groups = self.args
        ref = next(self.parameters())
        w = torch.zeros(cout, cin // groups, *k, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(cout, dtype=ref.dtype, device=ref.device)
        if self.conv is not None:
            kw, kb = self.conv.folded()
            w, b = w + kw, b + kb
        if self.scale is not None:
            kw, kb = self.scale.folded()
            w, b = w + _pad_to(kw, k), b + kb
        if self.skip is not None:
            kw, kb = fuse_bn(identity_kernel(cin, groups, k, ref), self.skip)
            w, b = w + kw, b + kb
        return w, b

    def drop_branches(self) -> None:
        self.conv = self.scale = self.skip = None

    def branches(self, x: Tensor) -> Tensor:
        """The sum of the branches, before the activation (training form)."""
        out = 0
        for branch in (self.conv, self.scale, self.skip):
            if branch is not None:
                out = out + branch(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.reparam(x) if self.reparam is not None else self.branches(x))


class LargeKernelConv(Reparameterizable):
    """GELU(BN(DWConv_k(x)) + BN(DWConv_3(x))): FastViT's reparameterizable large-kernel conv (RepLKNet)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, small: int = 3):
        super().__init__()
        self.args = (cin, cout, _pair(kernel), stride, cin)
        self.large = ConvBN(cin, cout, kernel, stride, cin)
        self.small = ConvBN(cin, cout, small, stride, cin)
        self.act = nn.GELU()
        self.reparam = None

    def conv_args(self) -> tuple:
        return self.args

    def folded(self) -> tuple[Tensor, Tensor]:
        (lw, lb), (sw, sb) = self.large.folded(), self.small.folded()
        return lw + _pad_to(sw, self.args[2]), lb + sb

    def drop_branches(self) -> None:
        self.large = self.small = None

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.reparam(x) if self.reparam is not None else self.large(x) + self.small(x))


class RepMixer(Reparameterizable):
    """x + s * (mixer(x) - norm(x)): mixer a depthwise MobileOne block without activation (conv, 1x1
    and identity branches), norm a BN identity, s a per-channel layer scale (FastViT's RepMixer)."""

    def __init__(self, dim: int, kernel, layer_scale_init: float):
        super().__init__()
        self.dim, self.kernel = dim, _pair(kernel)
        self.mixer = MobileOneBlock(dim, dim, kernel, groups=dim, act=False)
        self.norm = MobileOneBlock(dim, dim, kernel, groups=dim, act=False, conv_branch=False, scale_branch=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.reparam = None

    def conv_args(self) -> tuple:
        return (self.dim, self.dim, self.kernel, 1, self.dim)

    def folded(self) -> tuple[Tensor, Tensor]:
        (mw, mb), (nw, nb) = self.mixer.folded(), self.norm.folded()
        s = self.layer_scale.reshape(-1)
        ident = identity_kernel(self.dim, self.dim, self.kernel, mw)
        return ident + s.reshape(-1, 1, 1, 1) * (mw - nw), s * (mb - nb)

    def drop_branches(self) -> None:
        self.mixer = self.norm = None
        del self.layer_scale

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam is not None:
            return self.reparam(x)
        return x + self.layer_scale * (self.mixer.branches(x) - self.norm.branches(x))


class RepCPE(Reparameterizable):
    """x + DWConv_k(x) (conditional positional encoding), foldable to one depthwise conv."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.dim, self.kernel = dim, _pair(kernel)
        self.pe = nn.Conv2d(dim, dim, kernel, 1, kernel // 2, groups=dim, bias=True)
        self.reparam = None

    def conv_args(self) -> tuple:
        return (self.dim, self.dim, self.kernel, 1, self.dim)

    def folded(self) -> tuple[Tensor, Tensor]:
        return identity_kernel(self.dim, self.dim, self.kernel, self.pe.weight) + self.pe.weight, self.pe.bias

    def drop_branches(self) -> None:
        self.pe = None

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam(x) if self.reparam is not None else x + self.pe(x)


class ConvFFN(Reparameterizable):
    """fc2(GELU(fc1(BN(DWConv_k(x))))): 1x1 convolutions around a depthwise conv-BN (folded to one conv)."""

    def __init__(self, dim: int, hidden: int, kernel):
        super().__init__()
        self.dim, self.kernel = dim, _pair(kernel)
        self.conv = ConvBN(dim, dim, kernel, 1, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.reparam = None
        for m in (self.fc1, self.fc2):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def conv_args(self) -> tuple:
        return (self.dim, self.dim, self.kernel, 1, self.dim)

    def folded(self) -> tuple[Tensor, Tensor]:
        return self.conv.folded()

    def drop_branches(self) -> None:
        self.conv = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.reparam(x) if self.reparam is not None else self.conv(x)
        return self.fc2(self.act(self.fc1(x)))


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + s * ConvFFN(x)."""

    def __init__(self, dim: int, kernel, ffn_kernel, mlp_ratio: float, layer_scale_init: float):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel, layer_scale_init)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), ffn_kernel)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.ffn(x)


class MHSA(nn.Module):
    """Multi-head self-attention over the H*W positions of [B, C, H, W] (heads of ``head_dim``, no qkv bias)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        qkv = self.qkv(t).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        with attention_context(t):
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    """x = x + s1 * MHSA(BN(x)); x = x + s2 * ConvFFN(x) (FastViT's attention block)."""

    def __init__(self, dim: int, head_dim: int, ffn_kernel: int, mlp_ratio: float, layer_scale_init: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = MHSA(dim, head_dim)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), ffn_kernel)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.ffn(x)


class MCi(nn.Module):
    """The MCi image tower (module docstring): ``forward(pixels [B, 3, S, S]) -> [B, output_dim]``."""

    def __init__(self, cfg: MCiConfig, image_size: int, output_dim: int):
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        d = cfg.dims
        self.stem = nn.Sequential(MobileOneBlock(3, d[0], 3, stride=2),
                                  MobileOneBlock(d[0], d[0], 3, stride=2, groups=d[0]), MobileOneBlock(d[0], d[0], 1))
        stages = []
        for i, (n, mixer) in enumerate(zip(cfg.layers, cfg.token_mixers)):
            blocks: list[nn.Module] = []
            if mixer == "attention":
                blocks.append(RepCPE(d[i], cfg.cpe_kernel))
                blocks += [AttentionBlock(d[i], cfg.head_dim, cfg.ffn_kernel, cfg.mlp_ratio, cfg.layer_scale_init)
                           for _ in range(n)]
            else:
                blocks += [RepMixerBlock(d[i], cfg.repmixer_kernel, cfg.ffn_kernel, cfg.mlp_ratio, cfg.layer_scale_init)
                           for _ in range(n)]
            if i + 1 < len(d):  # downsampling patch embedding
                blocks += [LargeKernelConv(d[i], d[i + 1], cfg.down_kernel, 2), MobileOneBlock(d[i + 1], d[i + 1], 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        width = int(d[-1] * cfg.exp_ratio)
        self.conv_exp = MobileOneBlock(d[-1], width, 3, groups=d[-1])
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward_features(self, pixels: Tensor) -> Tensor:
        """The feature map after the head convolution: [B, exp_ratio * d_last, S/2^(stages+1), ...]."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got "
                             f"{pixels.shape[-2]}x{pixels.shape[-1]}; preprocess them with "
                             "clipforge.image_transform(model.image_size)")
        return self.conv_exp(self.stages(self.stem(pixels)))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.forward_features(pixels).mean(dim=(2, 3)) @ self.proj


class MCt(nn.Module):
    """The MCt text tower (module docstring): ``forward(ids [B, L]) -> [B, output_dim]``."""

    def __init__(self, cfg: TextConfig, mct: MCtConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))

        def mixer_block():
            return RepMixerBlock(cfg.width, (1, mct.kernel), (1, mct.kernel), mct.mlp_ratio, mct.layer_scale_init)

        self.first = nn.ModuleList([mixer_block() for _ in range(mct.blocks_first)])
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.last = nn.ModuleList([mixer_block() for _ in range(mct.blocks_last)])
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.empty(cfg.width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=cfg.width**-0.5)
        self.transformer.init_weights()

    @staticmethod
    def _conv_blocks(blocks: nn.ModuleList, x: Tensor) -> Tensor:
        if not len(blocks):
            return x
        y = x.transpose(1, 2).unsqueeze(2)  # [B, L, D] -> [B, D, 1, L]
        for block in blocks:
            y = block(y)
        return y.squeeze(2).transpose(1, 2)

    def forward_tokens(self, ids: Tensor) -> Tensor:
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape [B, L], got {tuple(ids.shape)}")
        if ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"token sequence of length {ids.shape[1]} exceeds the model's context length "
                             f"{self.cfg.context_length}; tokenize with context_length={self.cfg.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self._conv_blocks(self.first, x)
        x = self.transformer(x)
        return self.ln_final(self._conv_blocks(self.last, x))

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position of the first end-of-text token (last position when the text has none)."""
        is_eot = ids == self.cfg.eot_token_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))

    def forward(self, ids: Tensor) -> Tensor:
        states = self.forward_tokens(ids)
        return states[torch.arange(ids.shape[0], device=ids.device), self.eot_index(ids)] @ self.proj


class MobileCLIP(CLIP):
    """CLIP with the MCi image tower and the MCt text tower (module docstring)."""

    def __init__(self, cfg: MobileCLIPConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.visual = MCi(cfg.mci, cfg.vision.image_size, cfg.embed_dim)
        self.text = MCt(cfg.text, cfg.mct, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        if cfg.reparameterized:  # the folded layout of a saved inference model (weights are loaded after)
            _fold_all(self)

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("gradient checkpointing is not implemented for MobileCLIP's towers; "
                             "set grad_checkpointing=false")

    def encode_image_tokens(self, images: Tensor):
        raise ValueError("MobileCLIP's convolutional image tower has no patch tokens; train token-level loss terms "
                         "with a ViT model")

    def encode_text_tokens(self, ids: Tensor):
        raise ValueError("token-level text features need clipforge's own text transformer, not MobileCLIP's MCt")


def _fold_all(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(module, Reparameterizable):
            module.reparameterize()


def reparameterize(model: MobileCLIP) -> MobileCLIP:
    """A copy of ``model`` in the folded inference form (module docstring), in evaluation mode; its outputs
    equal ``model.eval()``'s. The copy's config says ``reparameterized: true`` so that it saves and loads."""
    if not isinstance(model, MobileCLIP):
        raise ValueError(f"reparameterize needs a MobileCLIP model, got a {type(model).__name__}")
    if model.cfg.reparameterized:
        raise ValueError(ALREADY)
    out = copy.deepcopy(model).eval()
    _fold_all(out)
    out.cfg = dataclasses.replace(model.cfg, reparameterized=True)
    return out
