"""What practitioners report beside FID: CLIP-T, CLIP-I, DINO subject fidelity, CMMD and drift.

- **CLIP-T**: image–prompt agreement, torchmetrics' own ``CLIPScore`` (``max(100 · mean cos, 0)``) on the CLIP
  model you give (:func:`build_clip_score`);
- **CLIP-I** / **DINO**: mean cosine similarity of every generated image to every reference (subject) image in
  CLIP / DINO features (:class:`ReferenceSimilarity`, DreamBooth's subject fidelity), from running sums;
- **CMMD** (Jayasumana et al. 2024, "Rethinking FID"): MMD² of unit CLIP embeddings, Gaussian RBF kernel,
  σ = 10, ×1000 (:class:`CMMD`, :func:`cmmd`);
- **drift**: the base and the adapted model draw the same unrelated prompts with the same seeds; drift is
  1 − mean cosine similarity of the pairs' features (:class:`Drift`), shown with the FID between the two sets.

Metrics follow torchmetrics (``update`` / ``compute`` / ``reset``); ``update`` takes uint8 ``N×3×S×S`` images
(fed through the metric's feature module) or float ``N×d`` features already extracted. Models come from
transformers (a hub id or a local folder). Images reach every encoder through :mod:`stella_diffusion.evaluation.images`
(one bicubic resize straight to the encoder's input side); the processor then only rescales and normalises, so
both image sets and all runs see one resize. :class:`SemanticScorer` and :func:`evaluate_drift` are the entry
points for a whole evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.multimodal import CLIPScore

from ..files import METADATA_FILE, list_images, read_jsonl
from .embedders import ClipEmbedder, feature_dim, image_side, module_device
from .generation import generate_images
from .images import RESIZE_CONVENTION, load_images
from .metrics import StreamingFID, compute_fid

CMMD_SIGMA = 10.0  # the paper's RBF bandwidth for unit CLIP embeddings
CMMD_SCALE = 1000.0  # the paper's scale, for readable numbers
SEMANTIC_RESIZE = f"{RESIZE_CONVENTION}, to the encoder's input side; the processor only rescales and normalises"


def _unit64(x: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected a non-empty N×d feature matrix, got shape {tuple(x.shape)}.")
    return F.normalize(x, dim=1)


def clip_score(image_features: Tensor, text_features: Tensor) -> float:
    """torchmetrics' CLIP score of paired embeddings: ``max(100 · mean cos(image, text), 0)``."""
    cos = (_unit64(image_features) * _unit64(text_features)).sum(dim=1)
    return max(100.0 * float(cos.mean()), 0.0)


def mean_pairwise_cosine(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Mean cosine similarity over all pairs of rows of ``x`` and ``y`` (CLIP-I, DINO): ``mean(x̂) · mean(ŷ)``."""
    return float(_unit64(x).mean(dim=0) @ _unit64(y).mean(dim=0))


def paired_drift(base: Tensor | np.ndarray, adapted: Tensor | np.ndarray) -> float:
    """``1 − mean cos(base_i, adapted_i)`` over paired rows: 0 when the adapter changed nothing."""
    a, b = _unit64(base), _unit64(adapted)
    if a.shape != b.shape:
        raise ValueError(f"Drift pairs rows: shapes {tuple(a.shape)} and {tuple(b.shape)} differ.")
    return 1.0 - float((a * b).sum(dim=1).mean())


def _rbf(x: Tensor, y: Tensor, sigma: float) -> Tensor:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return torch.exp(-squared.clamp_min(0.0) / (2.0 * sigma**2))


def cmmd(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    unbiased: bool = True,
) -> float:
    """CMMD: ``scale · MMD²`` of the unit-normalised rows of ``x`` and ``y``, Gaussian RBF kernel of width ``sigma``.

    Args:
        x, y: CLIP embeddings of the two sets (``N×d``, ``M×d``); normalised here.
        sigma, scale: the paper's 10 and 1000.
        unbiased: the U-statistic (diagonal of the within-set kernels left out; needs 2 rows per set), as the
            paper writes it. ``False`` gives the V-statistic (all pairs), what google-research/cmmd's code
            computes; it adds ``scale · (1 − mean k_xx) / N`` and the like, so small sets differ visibly.
    """
    x, y = _unit64(x), _unit64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Feature widths differ: {x.shape[1]} and {y.shape[1]}.")
    k_xx, k_yy, k_xy = _rbf(x, x, sigma), _rbf(y, y, sigma), _rbf(x, y, sigma)
    if not unbiased:
        return scale * float(k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean())
    n, m = x.shape[0], y.shape[0]
    if min(n, m) < 2:
        raise ValueError(f"Unbiased CMMD needs at least 2 images per set; got {n} and {m}.")
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return scale * float(within_x + within_y - 2.0 * k_xy.mean())


# ---- torchmetrics metrics -----------------------------------------------------------------------------------------


def build_clip_score(embedder: ClipEmbedder) -> CLIPScore:
    """torchmetrics' ``CLIPScore`` on ``embedder``'s model and processor: ``update(images, prompts)``.

    Images are uint8 ``N×3×S×S`` at ``embedder.image_size``.
    """
    return CLIPScore(model_name_or_path=lambda: (embedder, embedder.processor))


class _FeatureMetric(Metric):
    """Shared part: a feature module (or none, for features given directly) and unit float64 features."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, feature: nn.Module | None, num_features: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if feature is None and num_features is None:
            raise ValueError("Give a feature module or num_features.")
        self.feature = feature.eval() if feature is not None else None
        self.num_features = num_features if num_features is not None else feature_dim(feature, image_side(feature))

    @torch.no_grad()
    def _unit_features(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            if self.feature is None:
                raise ValueError("This metric has no feature module: pass float N×d features.")
            x = self.feature(x)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.num_features:
            raise ValueError(f"Got {x.shape[1]} features, expected {self.num_features}.")
        return F.normalize(x.double(), dim=1)


class ReferenceSimilarity(_FeatureMetric):
    """Mean cosine similarity of every generated image to every reference image: CLIP-I with a
    :class:`ClipEmbedder`, DINO subject fidelity with a DINO :class:`VisionEmbedder` (or any feature module,
    e.g. the shapes classifier). Running float64 sums of unit features: flat memory.

    Args:
        feature: maps uint8 ``N×3×S×S`` images to ``N×d``; ``None`` when only features are passed.
        num_features: ``d`` (default: the module's ``num_features`` or one forward pass).
    """

    higher_is_better = True
    real_sum: Tensor
    real_count: Tensor
    fake_sum: Tensor
    fake_count: Tensor

    def __init__(self, feature: nn.Module | None = None, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(feature, num_features, **kwargs)
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(self.num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: Tensor, real: bool) -> None:
        """Add uint8 images or float features to the reference (``real``) or the generated set."""
        features = self._unit_features(x)
        side = "real" if real else "fake"
        getattr(self, f"{side}_sum").add_(features.sum(dim=0))
        getattr(self, f"{side}_count").add_(features.shape[0])

    def compute(self) -> Tensor:
        """The mean pairwise cosine similarity (in [-1, 1])."""
        if int(self.real_count) == 0 or int(self.fake_count) == 0:
            counts = f"{int(self.real_count)} reference, {int(self.fake_count)} generated"
            raise RuntimeError(f"Both sets need images: {counts}.")
        return (self.real_sum / self.real_count) @ (self.fake_sum / self.fake_count)


class CMMD(_FeatureMetric):
    """CMMD between generated and reference images (:func:`cmmd`); keeps every unit embedding (``N×d``).

    Args:
        feature: a :class:`ClipEmbedder` (the paper's), or ``None`` when only features are passed.
        num_features: ``d`` (default: the module's).
        sigma, scale, unbiased: see :func:`cmmd`.
    """

    higher_is_better = False
    real_features: list[Tensor]
    fake_features: list[Tensor]

    def __init__(
        self,
        feature: nn.Module | None = None,
        num_features: int | None = None,
        sigma: float = CMMD_SIGMA,
        scale: float = CMMD_SCALE,
        unbiased: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature, num_features, **kwargs)
        self.sigma, self.scale, self.unbiased = sigma, scale, unbiased
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, x: Tensor, real: bool) -> None:
        """Add uint8 images or float features to the reference (``real``) or the generated set."""
        getattr(self, "real_features" if real else "fake_features").append(self._unit_features(x))

    def compute(self) -> Tensor:
        """``scale · MMD²`` (float64)."""
        if not self.real_features or not self.fake_features:
            raise RuntimeError("CMMD needs images in both sets.")
        value = cmmd(torch.cat(self.fake_features), torch.cat(self.real_features), self.sigma, self.scale,
                     self.unbiased)
        return torch.tensor(value, dtype=torch.float64)


class Drift(_FeatureMetric):
    """``1 − mean cos`` of paired base / adapted images (same prompt, same seed): how far the adapter moved
    what the model draws for prompts it was not trained on. 0 when it changed nothing.

    Args:
        feature: maps uint8 images to features (CLIP, DINO, ...); ``None`` when only features are passed.
        num_features: ``d`` (default: the module's).
    """

    higher_is_better = False
    cos_sum: Tensor
    count: Tensor

    def __init__(self, feature: nn.Module | None = None, num_features: int | None = None, **kwargs: Any) -> None:
        super().__init__(feature, num_features, **kwargs)
        self.add_state("cos_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, base: Tensor, adapted: Tensor) -> None:
        """Add pairs: row ``i`` of ``base`` and of ``adapted`` (uint8 images or float features) match."""
        if base.shape[0] != adapted.shape[0]:
            raise ValueError(f"Drift pairs images: {base.shape[0]} base and {adapted.shape[0]} adapted.")
        self.cos_sum.add_((self._unit_features(base) * self._unit_features(adapted)).sum())
        self.count.add_(base.shape[0])

    def compute(self) -> Tensor:
        """The drift, in [0, 2]."""
        if int(self.count) == 0:
            raise RuntimeError("Drift needs at least one image pair.")
        return 1.0 - self.cos_sum / self.count


# ---- folders and pipelines -----------------------------------------------------------------------------------------


def _batches(paths: Sequence[Path], size: int, batch_size: int):
    for start in range(0, len(paths), batch_size):
        yield load_images(paths[start : start + batch_size], size)


def embed_folder(folder: str | Path, feature: nn.Module, batch_size: int = 16) -> Tensor:
    """Features (float32, ``N×d``) of every image under ``folder``, in file order, at the module's image side."""
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"No images under {folder}.")
    with torch.no_grad():
        return torch.cat([feature(batch).float().cpu() for batch in _batches(paths, image_side(feature), batch_size)])


def _model_name(module: nn.Module | None, given: str | None) -> str | None:
    if module is None:
        return None
    return given or getattr(getattr(module, "config", None), "_name_or_path", None) or type(module).__name__


class SemanticScorer:
    """CLIP-T, CMMD, CLIP-I and DINO of generated folders; the reference and subject features are computed once.

    Args:
        clip: gives CLIP-T (prompts from the folder's ``metadata.jsonl``), CMMD (with ``reference``) and CLIP-I
            (with ``subject``).
        subject_feature: a DINO-like feature module: gives ``dino`` against ``subject`` (any module mapping uint8
            images to features, e.g. the shapes classifier as a stand-in).
        reference: image folder for CMMD (the FID reference).
        subject: folder of the subject's images (DreamBooth's instance images).
        clip_name, subject_name: how the models are named in records (default: their config's path).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        clip: ClipEmbedder | None = None,
        subject_feature: nn.Module | None = None,
        reference: str | Path | None = None,
        subject: str | Path | None = None,
        clip_name: str | None = None,
        subject_name: str | None = None,
        batch_size: int = 16,
    ) -> None:
        if subject is not None and clip is None and subject_feature is None:
            raise ValueError("Subject images need a CLIP model or a DINO model to be compared with.")
        self.clip, self.subject_feature, self.batch_size = clip, subject_feature, batch_size
        self.clip_score = build_clip_score(clip) if clip is not None else None
        self.cmmd = CMMD(clip) if clip is not None and reference is not None else None
        self.clip_i = ReferenceSimilarity(clip) if clip is not None and subject is not None else None
        with_dino = subject_feature is not None and subject is not None
        self.dino = ReferenceSimilarity(subject_feature) if with_dino else None
        self.reference_clip = embed_folder(reference, clip, batch_size) if self.cmmd is not None else None
        self.subject_clip = embed_folder(subject, clip, batch_size) if self.clip_i is not None else None
        self.subject_dino = embed_folder(subject, subject_feature, batch_size) if self.dino is not None else None
        self.convention = {
            "clip_model": _model_name(clip, clip_name),
            "clip_image_size": image_side(clip) if clip is not None else None,
            "dino_model": _model_name(subject_feature, subject_name) if self.dino is not None else None,
            "dino_image_size": image_side(subject_feature) if self.dino is not None else None,
            "resize": SEMANTIC_RESIZE,
            "cmmd": {"sigma": CMMD_SIGMA, "scale": CMMD_SCALE, "estimator": "unbiased"},
        }
        self.counts = {
            "num_reference_cmmd": None if self.reference_clip is None else self.reference_clip.shape[0],
            "num_subject": next((s.shape[0] for s in (self.subject_clip, self.subject_dino) if s is not None), None),
        }

    @torch.no_grad()
    def score(self, generated: str | Path) -> dict[str, Any]:
        """The scores of one generated folder: ``clip_t``, ``cmmd``, ``clip_i``, ``dino`` (those set up)."""
        record: dict[str, Any] = {}
        if self.clip is not None:
            record["clip_t"] = self._clip_t(Path(generated))
            features = embed_folder(generated, self.clip, self.batch_size)
            for key, metric, reference in (("cmmd", self.cmmd, self.reference_clip),
                                           ("clip_i", self.clip_i, self.subject_clip)):
                if metric is not None:
                    record[key] = self._against(metric, reference, features)
        if self.dino is not None:
            record["dino"] = self._against(self.dino, self.subject_dino,
                                           embed_folder(generated, self.subject_feature, self.batch_size))
        record.update({k: v for k, v in self.counts.items() if v is not None})
        record["semantic_convention"] = dict(self.convention)
        return record

    @staticmethod
    def _against(metric: Metric, reference: Tensor, generated: Tensor) -> float:
        metric.reset()
        metric.update(reference, real=True)
        metric.update(generated, real=False)
        return float(metric.compute())

    def _clip_t(self, folder: Path) -> float:
        metadata = folder / METADATA_FILE
        if not metadata.is_file():
            raise FileNotFoundError(f"CLIP-T needs the prompts: {metadata} (written by generate_images) is missing.")
        rows = [row for _, row in read_jsonl(metadata)]
        self.clip_score.reset()
        side = image_side(self.clip)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            images = load_images([folder / row["file_name"] for row in batch], side).to(module_device(self.clip))
            self.clip_score.update(images, [row["prompt"] for row in batch])
        return float(self.clip_score.compute())


def folder_drift(
    base_dir: str | Path,
    adapted_dir: str | Path,
    feature: nn.Module,
    fid_metric: StreamingFID | None = None,
    batch_size: int = 16,
    progress: bool = False,
    image_size: int | None = None,
    feature_name: str | None = None,
) -> dict[str, Any]:
    """Drift between two folders drawn on the same prompts and seeds (files paired by name).

    Args:
        base_dir, adapted_dir: the base model's and the adapted model's images.
        feature: the feature module of the cosine similarity (CLIP, DINO, ...).
        fid_metric: a :class:`~stella_diffusion.evaluation.metrics.StreamingFID`: also the FID (and KID) between
            the sets.
        batch_size: images per forward pass.
        progress: progress bars of the FID pass.
        image_size: side the images are loaded at (default: the module's ``image_size``).
        feature_name: how the features are named in the record (default: the module's model path or class).
    """
    base, adapted = list_images(base_dir), list_images(adapted_dir)
    if not base or [p.name for p in base] != [p.name for p in adapted]:
        raise ValueError(f"Drift needs the same image files in {base_dir} and {adapted_dir}.")
    metric = Drift(feature)
    side = image_size or image_side(feature)
    for start in range(0, len(base), batch_size):
        metric.update(load_images(base[start : start + batch_size], side),
                      load_images(adapted[start : start + batch_size], side))
    record: dict[str, Any] = {"drift": float(metric.compute()), "num_drift": len(base),
                              "drift_feature": _model_name(feature, feature_name)}
    if fid_metric is not None:
        fid = compute_fid(adapted_dir, base_dir, fid_metric, batch_size=batch_size, progress=progress)
        record.update({f"drift_{key}": fid[key] for key in ("fid", "kid_mean", "kid_std") if key in fid})
    return record


@torch.no_grad()
def evaluate_drift(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    feature: nn.Module,
    fid_metric: StreamingFID | None = None,
    seed: int = 0,
    batch_size: int = 8,
    generation_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Drift of ``pipe``'s LoRA adapters: draw ``prompts`` with the adapters off (``out_dir/base``) and on
    (``out_dir/adapted``), same seeds, then :func:`folder_drift`. The adapters are switched back on after.

    Args:
        pipe: a pipeline with LoRA adapters loaded (``disable_lora`` / ``enable_lora``).
        prompts: prompts unrelated to the fine-tune (one image each).
        out_dir: where the two folders go.
        feature, fid_metric: see :func:`folder_drift`.
        seed, batch_size, generation_kwargs: as :func:`~stella_diffusion.evaluation.generation.generate_images`.
        progress: progress bars.
    """
    out_dir = Path(out_dir)
    common = {"seed": seed, "batch_size": batch_size, "generation_kwargs": generation_kwargs, "overwrite": True,
              "progress": progress}
    pipe.disable_lora()
    try:
        generate_images(pipe, list(prompts), out_dir / "base", **common)
    finally:
        pipe.enable_lora()
    generate_images(pipe, list(prompts), out_dir / "adapted", **common)
    return folder_drift(out_dir / "base", out_dir / "adapted", feature, fid_metric, batch_size, progress)
