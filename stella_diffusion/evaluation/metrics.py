"""FID and KID between image sets, streamed with flat memory, in the style of torchmetrics' ``Metric``.

:class:`StreamingFID` follows torchmetrics' ``FrechetInceptionDistance`` (same running float64 sums of
features and of their outer products, same ``update(imgs, real)`` / ``compute`` / ``reset``, same Inception
module) and differs where it must:

- the Fréchet distance is :func:`frechet_distance`: float64 eigenvalues of the *symmetric* ``Fᵀ σ2 F``
  (``F Fᵀ = σ1``) with tiny negative ones clamped, where torchmetrics takes the eigenvalues of the
  non-symmetric ``σ1 σ2``, which go complex on near-singular covariances (and cost 1.5–4× more CPU time);
- the reference side can be a saved :class:`FeatureStats` (``.npz``), computed once and reused;
- KID comes from a bounded uniform reservoir of features per set (Vitter's algorithm R), whereas
  torchmetrics' ``KernelInceptionDistance`` keeps every feature in memory. With at most
  ``kid_max_samples`` images per set the reservoir holds all of them and KID is the usual estimate.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd

from .features import INCEPTION_IMAGE_SIZE, INCEPTION_NAME, load_inception
from .images import RESIZE_CONVENTION, iter_image_batches

ArrayLike = np.ndarray | Tensor

# Convention entries that must agree between the two sets (and with a saved statistics file).
_CONVENTION_KEYS = ("feature_extractor", "num_features", "image_size", "resize")


def _float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _symmetric(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr (s1 s2)^½`` from the eigenvalues of ``Fᵀ s2 F`` (symmetric PSD, same spectrum as ``s1 s2``) where
    ``F Fᵀ = s1``: the Cholesky factor (about 2.5× fewer flops than ``s1^½``) or, when ``s1`` is singular,
    its PSD square root by eigen-decomposition."""
    try:
        factor = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:
        factor = _psd_sqrt(s1)
    eigenvalues = np.linalg.eigvalsh(_symmetric(factor.T @ s2 @ factor))
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance ``|μ1 − μ2|² + tr(σ1 + σ2 − 2 (σ1 σ2)^½)`` between two Gaussians, in float64.

    ``tr (σ1 σ2)^½`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix ``Fᵀ σ2 F``
    with ``F Fᵀ = σ1`` (same spectrum as ``σ1 σ2``; ``F`` is the Cholesky factor, or ``σ1^½`` from an
    eigen-decomposition when σ1 is singular), with tiny negative eigenvalues from rounding clamped to zero:
    a singular or near-singular covariance (fewer images than feature dimensions) gives a finite real
    number, never NaN or a complex one. The result is clamped at zero, which it can only undershoot by
    rounding.
    """
    m1, m2 = _float64(mu1).reshape(-1), _float64(mu2).reshape(-1)
    s1, s2 = _symmetric(_float64(sigma1)), _symmetric(_float64(sigma2))
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"Shapes do not match: mu {m1.shape} / {m2.shape}, sigma {s1.shape} / {s2.shape}.")
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("Means and covariances must be finite.")
    diff = m1 - m2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2)), 0.0)


@dataclass
class FeatureStats:
    """Mean and covariance of one image set's features, plus the KID reservoir, as stored in an ``.npz``.

    The keys ``mu`` and ``sigma`` are those of pytorch-fid's statistics files, which therefore load too
    (without a convention to check and without KID).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    kid_features: np.ndarray | None = None
    convention: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write an uncompressed ``.npz`` (float64 statistics; covariances do not compress)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_samples": np.asarray(self.num_samples),
            "convention": np.asarray(json.dumps(self.convention)),
        }
        if self.kid_features is not None:
            arrays["kid_features"] = self.kid_features
        with path.open("wb") as f:  # a file object keeps numpy from appending ".npz" to other names
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by :meth:`save` (or pytorch-fid's ``mu`` / ``sigma`` files)."""
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} holds no 'mu' and 'sigma' arrays; not a statistics file.")
            return cls(
                mu=data["mu"].astype(np.float64),
                sigma=data["sigma"].astype(np.float64),
                num_samples=int(data["num_samples"]) if "num_samples" in data else -1,
                kid_features=data["kid_features"] if "kid_features" in data else None,
                convention=json.loads(str(data["convention"])) if "convention" in data else {},
            )


class StreamingFID(Metric):
    """FID (and KID) with fixed memory: ``update(imgs, real)`` any number of times, then ``compute()``.

    Args:
        feature: a module mapping uint8 ``N×3×S×S`` images to ``N×d`` features; ``None`` loads the FID
            Inception (:func:`~stella_diffusion.evaluation.features.load_inception`) from ``inception_weights``.
        inception_weights: path of torch-fidelity's Inception weights (default: torch hub cache, downloaded
            there when missing unless offline).
        offline: never download the Inception weights (default: ``HF_HUB_OFFLINE``).
        feature_name: how the extractor is named in results and statistics files.
        image_size: side the images are resized to (299 for Inception); recorded in the convention.
        kid_subset_size, kid_subsets: KID is the mean / std over ``kid_subsets`` random subsets of this size
            (as torchmetrics; reduced, with a warning, when a set has fewer samples).
        kid_max_samples: reservoir capacity per set (``capacity × d`` float32: 16 MB for 2048 × 2048); 0 turns
            KID off.
        seed: seeds the reservoir and the KID subsets, so results are reproducible.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    real_sum: Tensor
    real_outer: Tensor
    real_count: Tensor
    real_reservoir: Tensor
    fake_sum: Tensor
    fake_outer: Tensor
    fake_count: Tensor
    fake_reservoir: Tensor

    def __init__(
        self,
        feature: nn.Module | None = None,
        inception_weights: str | Path | None = None,
        feature_name: str | None = None,
        image_size: int = INCEPTION_IMAGE_SIZE,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        kid_max_samples: int = 2048,
        seed: int = 0,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if feature is not None and inception_weights is not None:
            raise ValueError("Give either a feature extractor or Inception weights, not both.")
        if feature is None:
            if image_size != INCEPTION_IMAGE_SIZE:
                raise ValueError(
                    f"The FID Inception takes {INCEPTION_IMAGE_SIZE}×{INCEPTION_IMAGE_SIZE} images."
                )
            feature, feature_name = load_inception(inception_weights, offline), INCEPTION_NAME
        self.feature = feature.eval()
        num_features = getattr(feature, "num_features", None)
        if num_features is None:
            with torch.no_grad():
                dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
                num_features = feature(dummy).reshape(1, -1).shape[1]
        self.num_features = int(num_features)
        self.convention: dict[str, Any] = {
            "feature_extractor": feature_name or type(feature).__name__,
            "num_features": self.num_features,
            "image_size": image_size,
            "resize": RESIZE_CONVENTION,
        }
        self.kid_subset_size, self.kid_subsets, self.seed = kid_subset_size, kid_subsets, seed
        self._generator = torch.Generator().manual_seed(seed)
        self.reference: FeatureStats | None = None
        d = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            # reservoirs are not merged across processes: KID is single-process
            self.add_state(f"{side}_reservoir", torch.zeros(kid_max_samples, d), dist_reduce_fx=None)

    def update(self, imgs: Tensor, real: bool) -> None:
        """Add a batch of uint8 ``N×3×S×S`` images to the real (reference) or fake (generated) set."""
        if real and self.reference is not None:
            raise RuntimeError(
                "The reference set is fixed by loaded statistics; update with real=False only."
            )
        features = self.feature(imgs).reshape(imgs.shape[0], -1)
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"The extractor gave {features.shape[1]} features, expected {self.num_features}."
            )
        side = "real" if real else "fake"
        seen = int(getattr(self, f"{side}_count"))
        f64 = features.double()
        getattr(self, f"{side}_sum").add_(f64.sum(dim=0))
        getattr(self, f"{side}_outer").add_(f64.T @ f64)
        getattr(self, f"{side}_count").add_(features.shape[0])
        self._add_to_reservoir(getattr(self, f"{side}_reservoir"), seen, features.float())

    def _add_to_reservoir(self, reservoir: Tensor, seen: int, features: Tensor) -> None:
        # algorithm R: the i-th sample (0-based) replaces a uniform slot j ≤ i when j < capacity
        capacity = reservoir.shape[0]
        direct = min(max(capacity - seen, 0), features.shape[0])
        reservoir[seen : seen + direct] = features[:direct]
        rest = features[direct:]
        if rest.shape[0]:
            positions = torch.arange(seen + direct + 1, seen + features.shape[0] + 1, dtype=torch.float64)
            slots = (
                torch.rand(rest.shape[0], generator=self._generator, dtype=torch.float64) * positions
            ).long()
            for row, slot in zip(
                rest, slots.tolist(), strict=True
            ):  # in order: a later sample wins a shared slot
                if slot < capacity:
                    reservoir[slot] = row

    def _kid_features(self, side: str) -> Tensor:
        count = min(int(getattr(self, f"{side}_count")), getattr(self, f"{side}_reservoir").shape[0])
        return getattr(self, f"{side}_reservoir")[:count]

    def _set_stats(self, side: str) -> FeatureStats:
        n = int(getattr(self, f"{side}_count"))
        if n < 2:
            raise RuntimeError(f"FID needs at least 2 images per set; the {side} set has {n}.")
        total = getattr(self, f"{side}_sum").cpu().numpy()
        mu = total / n
        sigma = (getattr(self, f"{side}_outer").cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        kid = self._kid_features(side).cpu().numpy() if self.kid_enabled else None
        return FeatureStats(mu, _symmetric(sigma), n, kid, dict(self.convention))

    @property
    def kid_enabled(self) -> bool:
        """Whether KID is tracked (a non-empty reservoir)."""
        return self.real_reservoir.shape[0] > 0

    def reference_stats(self) -> FeatureStats:
        """Statistics of the reference (real) set, to save with :meth:`FeatureStats.save` and reuse."""
        return self.reference if self.reference is not None else self._set_stats("real")

    def generated_stats(self) -> FeatureStats:
        """Statistics of the generated (fake) set."""
        return self._set_stats("fake")

    def set_reference(self, stats: FeatureStats | None) -> None:
        """Use saved statistics as the reference set (same convention required); ``None`` clears it."""
        self._computed = None
        if stats is None:
            self.reference = None
            return
        mismatched = {
            key: (stats.convention[key], self.convention[key])
            for key in _CONVENTION_KEYS
            if key in stats.convention and stats.convention[key] != self.convention[key]
        }
        if mismatched or stats.mu.shape != (self.num_features,):
            raise ValueError(
                f"Reference statistics do not match this metric (saved vs current: {mismatched}, "
                f"dimension {stats.mu.shape} vs {self.num_features}); recompute them with the same settings."
            )
        if not stats.convention:
            warnings.warn("Reference statistics record no convention; cannot check they match.", stacklevel=2)
        if int(self.real_count):
            raise RuntimeError(
                "Real images were already added; reset() the metric before loading statistics."
            )
        self.reference = stats

    def compute(self) -> dict[str, float | int]:
        """``fid``, and when KID is on ``kid_mean``, ``kid_std`` and the ``kid_subset_size`` used."""
        real, fake = self.reference_stats(), self.generated_stats()
        result: dict[str, float | int] = {"fid": frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)}
        if self.kid_enabled and real.kid_features is None:
            warnings.warn("The reference statistics hold no KID features: KID is not computed.", stacklevel=2)
        elif self.kid_enabled:
            result.update(self._kid(torch.from_numpy(real.kid_features), self._kid_features("fake").cpu()))
        return result

    def _kid(self, real: Tensor, fake: Tensor) -> dict[str, float | int]:
        size = min(self.kid_subset_size, real.shape[0], fake.shape[0])
        if size < self.kid_subset_size:
            warnings.warn(
                f"KID subsets reduced to {size} samples (fewer images than kid_subset_size).", stacklevel=3
            )
        generator = torch.Generator().manual_seed(self.seed)
        real, fake = real.double(), fake.double()
        scores = torch.stack(
            [
                poly_mmd(
                    real[torch.randperm(real.shape[0], generator=generator)[:size]],
                    fake[torch.randperm(fake.shape[0], generator=generator)[:size]],
                )
                for _ in range(self.kid_subsets)
            ]
        )
        return {
            "kid_mean": float(scores.mean()),
            "kid_std": float(scores.std(unbiased=False)),
            "kid_subset_size": size,
        }

    def reset(self) -> None:
        """Clear both image sets (loaded reference statistics stay) and restart the random streams."""
        super().reset()
        self._generator.manual_seed(self.seed)

    def update_folder(
        self,
        folder: str | Path,
        real: bool,
        batch_size: int = 50,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> int:
        """Stream the images under ``folder`` into one set; returns the number used (unreadable skipped)."""
        count = 0
        for batch in iter_image_batches(
            folder, self.convention["image_size"], batch_size, num_workers, progress
        ):
            self.update(batch.to(self.device), real=real)
            count += batch.shape[0]
        return count


def compute_fid(
    generated: str | Path,
    reference: str | Path,
    metric: StreamingFID,
    batch_size: int = 50,
    save_stats: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FID / KID of a generated folder against a reference folder or ``.npz`` statistics, as a result record.

    With ``save_stats`` the reference statistics are written there (computed once, reused by passing the
    ``.npz`` as ``reference`` later). The record also holds the counts and the convention used.
    """
    metric.reset()
    reference = Path(reference)
    is_stats = reference.suffix == ".npz"
    metric.set_reference(FeatureStats.load(reference) if is_stats else None)
    if not is_stats:
        metric.update_folder(reference, real=True, batch_size=batch_size, progress=progress)
    metric.update_folder(generated, real=False, batch_size=batch_size, progress=progress)
    reference_stats = metric.reference_stats()
    if save_stats is not None:
        reference_stats.save(save_stats)
    return {
        "generated": str(generated),
        "reference": str(reference),
        **metric.compute(),
        "num_generated": int(metric.fake_count),
        "num_reference": reference_stats.num_samples,
        "convention": dict(metric.convention),
    }
