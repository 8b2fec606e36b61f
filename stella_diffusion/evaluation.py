"""Judge a fine-tune: generate on fixed prompts and seeds, then FID / KID against reference images.

The base pipeline and the adapted one are drawn on the same prompts and seeds, so their scores differ only by
the adapter. On the shapes domain (``feature_extractor="domain"``) the committed classifier also says which
share of images shows what each prompt asked for (shape, colour, style, ...). The training script runs
:func:`evaluate_pipeline` after training when ``--eval_reference_dir`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .domain_classifier import DomainClassifier, DomainFeatures, domain_feature_extractor, prompted_accuracy
from .generate import generate_images, read_jsonl, read_prompts
from .images import load_image
from .inception import load_feature_extractor
from .metrics import StreamingFID, compute_fid
from .report import write_report

FEATURE_EXTRACTORS = ("inception", "domain")  # or "module:callable"
_NOT_ATTRIBUTES = frozenset({"text", "prompt", "file_name", "jitter"})


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt and, optionally, the attribute values it asks for (``{"shape": "star"}``)."""

    text: str
    expected: dict[str, str] = field(default_factory=dict)


def read_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """Prompts from a ``.txt`` (one a line) or a ``.jsonl`` (``text`` column; string columns = attributes).

    A ``metadata.jsonl`` of :func:`stella_diffusion.domain.write_image_folder` is such a file: evaluating on
    a reference folder's own captions asks for the attributes its images have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Evaluation prompts {path}: no such file.")
    if path.suffix != ".jsonl":
        return [EvalPrompt(text) for text in read_prompts(path)]
    prompts = []
    for number, row in read_jsonl(path):
        text = row.get("text", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number} has no 'text' (or 'prompt') string.")
        expected = {k: v for k, v in row.items() if k not in _NOT_ATTRIBUTES and isinstance(v, str)}
        prompts.append(EvalPrompt(text, expected))
    if not prompts:
        raise ValueError(f"No prompts in {path}.")
    return prompts


def cycle_prompts(prompts: Sequence[EvalPrompt], num_images: int) -> list[EvalPrompt]:
    """``num_images`` prompts: the list repeated (image ``i`` gets prompt ``i mod len``), for a fixed budget."""
    if not prompts:
        raise ValueError("No evaluation prompts.")
    return [prompts[i % len(prompts)] for i in range(num_images)]


def build_fid_metric(feature_extractor: str = "inception", kid_max_samples: int = 2048, seed: int = 0) -> StreamingFID:
    """A :class:`StreamingFID` on ``"inception"``, ``"domain"`` (shapes classifier) or ``"module:callable"``.

    The image side is the extractor's ``image_size`` attribute when it has one (32 for the shapes
    classifier), else Inception's 299.
    """
    if feature_extractor == "inception":
        return StreamingFID(kid_max_samples=kid_max_samples, seed=seed)
    if feature_extractor == "domain":
        extractor, name = domain_feature_extractor(), "shapes-classifier"
    else:
        extractor, name = load_feature_extractor(feature_extractor), feature_extractor
    size = getattr(extractor, "image_size", 299)
    return StreamingFID(extractor, feature_name=name, image_size=size, kid_max_samples=kid_max_samples, seed=seed)


@torch.no_grad()
def folder_accuracy(
    folder: str | Path, prompts: Sequence[EvalPrompt], classifier: DomainClassifier
) -> dict[str, float] | None:
    """Share of the folder's images (in file order) that show the attributes their prompt asks for.

    Attributes are those every prompt names and the classifier knows; ``None`` when there are none.
    """
    attributes = set(classifier.attributes)
    for prompt in prompts:
        attributes &= set(prompt.expected)
    if not attributes:
        return None
    files = sorted(Path(folder).glob("*.png"))
    if len(files) != len(prompts):
        raise ValueError(f"{folder} holds {len(files)} images for {len(prompts)} prompts.")
    pixels = np.stack([load_image(f, classifier.resolution) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    ordered = tuple(a for a in classifier.attributes if a in attributes)
    return prompted_accuracy(classifier, images, [p.expected for p in prompts], attributes=ordered)


@torch.no_grad()
def evaluate_pipeline(
    pipe: DiffusionPipeline,
    name: str,
    prompts: Sequence[EvalPrompt],
    out_dir: str | Path,
    reference: str | Path,
    metric: StreamingFID,
    seed: int = 0,
    batch_size: int = 8,
    generation_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Draw one image per prompt into ``out_dir/name``, then score it: a result record for the report.

    The record is :func:`~stella_diffusion.metrics.compute_fid`'s with the run ``name`` and, when the metric
    uses the shapes classifier and the prompts carry attributes, ``accuracy`` per attribute (and ``all``).
    """
    folder = Path(out_dir, name)
    generate_images(pipe, [p.text for p in prompts], folder, seed=seed, batch_size=batch_size,
                    generation_kwargs=generation_kwargs, overwrite=True, progress=progress)
    record = {"name": name, **compute_fid(folder, reference, metric, progress=progress)}
    if isinstance(metric.feature, DomainFeatures):
        accuracy = folder_accuracy(folder, prompts, metric.feature.classifier)
        if accuracy is not None:
            record["accuracy"] = accuracy
    return record


def evaluate_against_base(
    pipe: DiffusionPipeline,
    name: str,
    prompts: Sequence[EvalPrompt],
    out_dir: str | Path,
    reference: str | Path,
    metric: StreamingFID,
    include_base: bool = True,
    title: str = "Fine-tune vs base",
    **kwargs: Any,
) -> dict[str, Path]:
    """Score ``pipe`` with its LoRA adapters off (``"base"``) and on (``name``); write the report under ``out_dir``.

    ``kwargs`` go to :func:`evaluate_pipeline` (seed, batch size, generation settings). Returns the paths of
    ``report.json``, ``report.md`` and ``report.png``; the images are in ``out_dir/base`` and ``out_dir/name``.
    """
    runs = []
    if include_base:
        pipe.disable_lora()
        try:
            runs.append(evaluate_pipeline(pipe, "base", prompts, out_dir, reference, metric, **kwargs))
        finally:
            pipe.enable_lora()
    runs.append(evaluate_pipeline(pipe, name, prompts, out_dir, reference, metric, **kwargs))
    return write_report(runs, out_dir, title)
