"""Preparing the pipeline's models for training: the adapter checked against the models' configs before any
weight is read, precision that keeps the adapters in float32, xformers."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline
from torch import nn

from ..tuner.factors import layer_dims
from .adapters import Adapter
from .config import TrainingError
from .families import PipelineFamily

logger = get_logger(__name__)


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


def _component_on_meta(model_path: str, revision: str | None, name: str, entry: Any) -> nn.Module:
    """The pipeline component ``name`` built from its config on the meta device (no weights are read)."""
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    try:
        if library == "transformers":
            config = transformers.AutoConfig.from_pretrained(model_path, subfolder=name, revision=revision)
        else:
            config = cls.load_config(model_path, subfolder=name, revision=revision)
    except Exception as err:  # hub / file errors come in many classes; all mean "no usable config there"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"--pretrained_model_name_or_path {model_path}: no usable {name}/ ({first}).") from err
    with torch.device("meta"):
        return cls._from_config(config) if library == "transformers" else cls.from_config(config)


def adapted_components(model_path: str, revision: str | None, family: PipelineFamily, train_text_encoder: bool,
                       adapter: Adapter) -> list[str]:
    """The components that get the adapter, checked against the models' configs before any weight is loaded.

    The denoiser must be there; the trainable text encoders are taken where the pipeline has them (SDXL has no
    ``text_encoder_3``). Every target (``--lora_layers`` entry or preset) must match a layer an adapter can take,
    and the rank must fit each matched layer (U and V need ``rank ≤ min(in, out)`` orthonormal columns; LoRA is
    held to the same bound, so the comparison is like for like); PiSSA's start takes linear layers only.

    Args:
        model_path: the pipeline folder or hub id.
        revision: its revision on the hub.
        family: the pipeline's family (names the denoiser and the trainable text encoders).
        train_text_encoder: whether the text encoders get the adapter too.
        adapter: the adapter to add.

    Returns:
        the component names, the denoiser first.
    """
    index = DiffusionPipeline.load_config(model_path, revision=revision)

    def present(name: str) -> bool:
        return bool(index.get(name)) and index[name][0] is not None

    if not present(family.denoiser):
        raise TrainingError(f"--pretrained_model_name_or_path {model_path} has no {family.denoiser} component.")
    encoders = [name for name in family.trainable_text_encoders if present(name)] if train_text_encoder else []
    components = [family.denoiser, *encoders]
    for name in components:
        model = _component_on_meta(model_path, revision, name, index[name])
        layers = dict(model.named_modules())
        for target in adapter.targets(name, model):
            matched = {n: m for n, m in layers.items() if n == target or n.endswith("." + target)}
            if not matched:
                raise TrainingError(f"--lora_layers: {target!r} matches no module of the {name} "
                                    f"({type(model).__name__}).")
            for layer_name, layer in matched.items():
                try:
                    dims = layer_dims(layer, f"{name}.{layer_name}")
                except (TypeError, ValueError) as err:
                    raise TrainingError(f"--lora_layers: {err}") from None
                if not adapter.adapts_convolutions and isinstance(layer, nn.modules.conv._ConvNd):
                    raise TrainingError(f"--adapter {adapter.settings.adapter} cannot adapt convolutions (peft's "
                                        f"start takes linear layers only), and {target!r} matches {name}."
                                        f"{layer_name} ({type(layer).__name__}): leave it out of --lora_layers.")
                if adapter.settings.rank > min(dims):
                    raise TrainingError(f"--rank {adapter.settings.rank} exceeds min(in, out) = {min(dims)} of "
                                        f"{name}.{layer_name}; choose a rank of at most {min(dims)}.")
    return components


@torch.no_grad()
def check_identical_across_processes(accelerator: Accelerator, params: Sequence[torch.Tensor]) -> None:
    """With several processes, check that every process ends with bit-identical trained parameters.

    DDP averages gradients before each step and the Riemannian hooks run inside the step with the same inputs,
    so U, S, V must agree to the bit; a difference would mean the export (written by the main process) is not
    the model the other processes trained.
    """
    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()[:16]), dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine[None]).reshape(accelerator.num_processes, -1)
    if not bool((every == every[0]).all()):
        raise TrainingError("The trained adapter differs between processes; the export would not be the model "
                            "every process trained.")
    logger.info(f"Trained adapter identical on all {accelerator.num_processes} processes (sha256 "
                f"{digest.hexdigest()[:16]}).")
