"""Preparing the pipeline's models for training: precision that keeps the adapters in float32, xformers."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainingError


def enable_xformers(model: nn.Module) -> None:
    """diffusers' xformers switch, with one clear error where xformers is installed but cannot run.

    An xformers wheel built for another torch imports fine but has no CUDA kernel (diffusers' probe then raises
    "No operator found"); on CPU diffusers refuses it outright.
    """
    try:
        model.enable_xformers_memory_efficient_attention()
    except (NotImplementedError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"--enable_xformers_memory_efficient_attention: xformers cannot run here ({reason}). It needs a CUDA "
            f"GPU and an xformers build for torch {torch.__version__}; without the flag PyTorch's own "
            "scaled-dot-product attention is used."
        ) from err


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` but keep every trainable parameter's float32 values untouched.

    Casting the whole model and upcasting the adapters afterwards (diffusers' way) would round StelLA's U and V
    off the Stiefel manifold; trainable fp16 weights are the "Attempting to unscale FP16 gradients" error.
    """
    if all(p.dtype == dtype for p in model.parameters() if not p.requires_grad):
        return
    trainable = [(p, p.data.float()) for p in model.parameters() if p.requires_grad]
    model.to(dtype)
    for param, data in trainable:
        param.data = data
