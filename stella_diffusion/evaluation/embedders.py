"""The image and text encoders the semantic metrics read: CLIP (CLIP-T, CLIP-I, CMMD) and any transformers vision
backbone such as DINO / DINOv2 (subject fidelity), loaded from a hub id or a local folder, checked before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor, nn

from .features import offline_requested


class ModelNotFoundError(FileNotFoundError):
    """A model given by hub id or path cannot be found (before anything is loaded)."""


def check_model_source(name_or_path: str | Path, offline: bool | None = None) -> None:
    """Fail before loading when a model cannot be had: a folder without ``config.json``, a path that does not
    exist, or offline a hub id missing from the Hugging Face cache. Online, a hub id is left to the download.

    Args:
        name_or_path: a hub id (``openai/clip-vit-large-patch14``) or a local folder (``save_pretrained``).
        offline: no hub access (default: ``HF_HUB_OFFLINE``).
    """
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a transformers model folder.")
        return
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelNotFoundError(f"Model {spec}: no such folder (and not a hub id 'org/name').")
    if offline_requested(offline) and not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise ModelNotFoundError(
            f"Model {spec} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE or --offline): "
            "download it on a machine with internet or pass a local folder."
        )


def _load_pretrained(name_or_path: str | Path, offline: bool | None) -> tuple[nn.Module, Any]:
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    check_model_source(name_or_path, offline)
    kwargs = {"local_files_only": offline_requested(offline)}
    try:
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
        is_clip = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
        processor = (AutoProcessor if is_clip else AutoImageProcessor).from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"Could not load model {name_or_path}: {err}") from err
    return model.eval().requires_grad_(False), processor


def _input_side(image_processor: Any) -> int:
    """The square side the processor would hand the model (its crop, else its resize target)."""
    for size in (image_processor.crop_size if image_processor.do_center_crop else None, image_processor.size):
        if size:
            size = dict(size)
            if "height" in size:
                return int(size["height"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"])
    raise ValueError(f"Cannot tell the input size of {type(image_processor).__name__}.")


def _normalise_only(image_processor: Any) -> int:
    # images arrive at the model's side already (images.py's resize): a second resize or crop would differ per set
    side = _input_side(image_processor)
    image_processor.do_resize = False
    image_processor.do_center_crop = False
    return side


def _check_images(images: Tensor, size: int) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(
            f"Expected uint8 N×3×{size}×{size} images (load them with stella_diffusion.evaluation.images at the "
            f"encoder's image_size), got {images.dtype} {tuple(images.shape)}."
        )


def _as_tensor(output: Any) -> Tensor:
    # transformers ≥ 5 returns BaseModelOutputWithPooling from get_*_features (the projection is its
    # pooler_output); torchmetrics 1.9 expects a tensor (its fix, PR #3428, is not released)
    return output if isinstance(output, Tensor) else output.pooler_output


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's parameters."""
    return next(module.parameters()).device


class ClipEmbedder(nn.Module):
    """A transformers CLIP model and processor: ``forward`` maps uint8 images to image embeddings.

    Also the model torchmetrics' ``CLIPScore`` is given (:func:`build_clip_score`): its ``get_image_features`` /
    ``get_text_features`` return tensors whatever the transformers version.

    Args:
        model: a ``CLIPModel`` (or any model with ``get_image_features`` / ``get_text_features``).
        processor: its ``CLIPProcessor``; resizing and cropping are switched off (see the module docstring).
    """

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.config = model.config  # torchmetrics reads the text length limit from it
        self.image_size = _normalise_only(processor.image_processor)
        self.num_features = int(model.config.projection_dim)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def forward(self, images: Tensor) -> Tensor:
        _check_images(images, self.image_size)
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        return self.get_image_features(pixels.to(module_device(self.model)))


class VisionEmbedder(nn.Module):
    """Any transformers vision backbone (DINO, DINOv2, ViT, ...): uint8 images → CLS token or pooler output.

    Args:
        model: the backbone (``AutoModel``).
        image_processor: its image processor; resizing and cropping are switched off.
        pooling: ``"cls"`` (first token of the last hidden state, DreamBooth's DINO metric) or ``"pooler"``.
    """

    def __init__(self, model: nn.Module, image_processor: Any, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "pooler"):
            raise ValueError(f"pooling must be 'cls' or 'pooler', got {pooling!r}.")
        self.model, self.image_processor, self.pooling = model.eval(), image_processor, pooling
        self.image_size = _normalise_only(image_processor)

    def forward(self, images: Tensor) -> Tensor:
        _check_images(images, self.image_size)
        pixels = self.image_processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        output = self.model(pixel_values=pixels.to(module_device(self.model)))
        if self.pooling == "pooler":
            return output.pooler_output.flatten(1)
        hidden = output.last_hidden_state
        if hidden.ndim != 3:
            name = type(self.model).__name__
            raise ValueError(f"{name} gives no token sequence for a CLS token; use pooling='pooler'.")
        return hidden[:, 0]


def load_clip_embedder(
    name_or_path: str | Path, offline: bool | None = None, device: str | torch.device = "cpu"
) -> ClipEmbedder:
    """A CLIP model and processor through transformers (``--clip_model``).

    Args:
        name_or_path: hub id or local folder holding the model and its processor.
        offline: no hub access (default: ``HF_HUB_OFFLINE``).
        device: where the model runs.
    """
    model, processor = _load_pretrained(name_or_path, offline)
    if not isinstance(model, nn.Module) or not hasattr(model, "get_text_features"):
        raise ValueError(f"{name_or_path} is a {type(model).__name__}, not a CLIP model with a text tower.")
    return ClipEmbedder(model, processor).to(device)


def load_vision_embedder(
    name_or_path: str | Path, offline: bool | None = None, device: str | torch.device = "cpu", pooling: str = "cls"
) -> nn.Module:
    """A transformers vision backbone as a feature module (``--dino_model``); a CLIP model gives its image tower.

    Args:
        name_or_path: hub id or local folder (e.g. ``facebook/dino-vits16``, ``facebook/dinov2-base``).
        offline: no hub access (default: ``HF_HUB_OFFLINE``).
        device: where the model runs.
        pooling: ``"cls"`` or ``"pooler"`` (see :class:`VisionEmbedder`).
    """
    model, processor = _load_pretrained(name_or_path, offline)
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        return ClipEmbedder(model, processor).to(device)
    return VisionEmbedder(model, processor, pooling).to(device)


def feature_dim(feature: nn.Module, image_size: int) -> int:
    """The module's ``num_features``, else the width of its output on one black image."""
    num_features = getattr(feature, "num_features", None)
    if num_features is None:
        with torch.no_grad():
            dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
            num_features = feature(dummy).reshape(1, -1).shape[1]
    return int(num_features)


def image_side(feature: nn.Module, default: int = 224) -> int:
    """The square side a feature module takes (its ``image_size``), for loading folders."""
    return int(getattr(feature, "image_size", default))


# ---- the maths, in float64 --------------------------------------------------------------------------------------
