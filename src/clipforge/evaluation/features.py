"""Encode images and texts in batches, in eval mode, without gradients, on the model's device (features
come back on the CPU)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..transforms import image_transform, normalize_batch


def _on_model_device(x, model):
    """``x`` on the device of ``model``'s parameters (non-tensors, such as a pivot model's raw texts, as they are;
    a model without parameters, such as a stand-in in a test, runs where ``x`` is)."""
    parameters = getattr(model, "parameters", None)
    param = next(parameters(), None) if callable(parameters) else None
    return x.to(param.device) if torch.is_tensor(x) and param is not None else x


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], tokenizer: Callable, batch_size: int = 256) -> Tensor:
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[i : i + batch_size]))
        out.append(model.encode_text(_on_model_device(ids, model)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


@torch.no_grad()
def encode_images(model, images: Sequence, batch_size: int = 256) -> Tensor:
    """``images``: uint8 tensors [3, H, W] at the model's size, or anything the eval transform accepts."""
    was_training = model.training
    model.eval()
    transform = image_transform(model.image_size, is_train=False)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if all(isinstance(im, Tensor) and im.dtype == torch.uint8 for im in chunk):
            pixels = normalize_batch(torch.stack(list(chunk)))
        else:
            pixels = torch.stack([transform(im) for im in chunk])
        out.append(model.encode_image(_on_model_device(pixels, model)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


@torch.no_grad()
def encode_image_tokens(model, images: Sequence, batch_size: int = 256) -> Tensor:
    """The projected patch tokens [N, P, d] of ``images`` (:meth:`CLIP.encode_image_tokens`), prepared as
    :func:`encode_images` prepares them."""
    was_training = model.training
    model.eval()
    transform = image_transform(model.image_size, is_train=False)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if all(isinstance(im, Tensor) and im.dtype == torch.uint8 for im in chunk):
            pixels = normalize_batch(torch.stack(list(chunk)))
        else:
            pixels = torch.stack([transform(im) for im in chunk])
        out.append(model.encode_image_tokens(_on_model_device(pixels, model))[1].float().cpu())
    model.train(was_training)
    return torch.cat(out)
