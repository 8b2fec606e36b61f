"""Stiefel-manifold math for StelLA as pure, batched tensor functions.

Every function takes "tall" matrices ``X`` of shape ``(..., n, r)`` with ``n >= r`` and orthonormal columns
(``Xᵀ X = I``), and works on any number of leading batch dimensions, so that all adapter factors of one
shape are handled by one call (one batched SVD per shape, docs/algorithm.md §3.4). Inputs of lower precision are
computed in float32 and returned in float32: callers cast back when they write into a parameter.
"""

from __future__ import annotations

from typing import Literal

import torch

Retraction = Literal["polar", "exp", "qr", "cayley"]
RETRACTIONS: tuple[str, ...] = ("polar", "exp", "qr", "cayley")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Manifold math runs in at least float32 (bf16/fp16 lose orthonormality within a few steps)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _mT(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -1)


def _times_small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``X W`` for a tall ``X`` (..., n, k) and a small ``W`` (..., k, m), computed as ``(Wᵀ Xᵀ)ᵀ``.

    The same product, but BLAS writes m rows of n much faster than n rows of m when m is small (about 3x for 112
    matrices of 64 × 4 on CPU), and the result is laid out as m × n, the layout the next ``Xᵀ Y`` reads fastest.
    """
    return _mT(_mT(w) @ _mT(x))


def sym(a: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(A + Aᵀ) / 2``."""
    return 0.5 * (a + _mT(a))


def riemannian_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Riemannian gradient of the spec (§3.1): ``G − X (Gᵀ X)``.

    This is the gradient under the canonical metric; it satisfies ``Xᵀ G' + G'ᵀ X = 0`` (tangent).
    """
    x, grad = _f32(x), _f32(grad)
    return grad - _times_small(x, _mT(grad) @ x)


def project_tangent(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection onto the tangent space at ``X``: ``Δ − X sym(Xᵀ Δ)``."""
    x, delta = _f32(x), _f32(delta)
    return delta - _times_small(x, sym(_mT(x) @ delta))


def _svd_driver(t: torch.Tensor) -> str | None:
    # gesvda is cuSOLVER's fast driver for tall thin matrices; on CPU only the default driver exists.
    return "gesvda" if t.is_cuda else None


def _polar_svd(a: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(a, full_matrices=False, driver=_svd_driver(a))
    return _times_small(p, qh)


# The Gram route squares the condition number of A; past κ(A) = 2 (this ratio of the smallest to the largest
# eigenvalue of AᵀA) its float32 error would grow beyond the SVD's, so those matrices take the SVD. A retraction
# stays far inside: for a tangent Δ, (X + Δ)ᵀ(X + Δ) = I + ΔᵀΔ, and κ = 2 needs a step of spectral norm √3.
_GRAM_MIN_EIGENVALUE_RATIO = 0.25


def polar(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor ``P Qᵀ`` of ``A = P Σ Qᵀ`` (thin), batched.

    On CUDA: the thin SVD with cuSOLVER's ``gesvda``. Elsewhere: ``A (AᵀA)^(-1/2)`` from the eigendecomposition
    ``AᵀA = Q Λ Qᵀ`` of the small r × r Gram matrix, since a batched SVD on CPU is one LAPACK call per tall matrix
    while one batched r × r ``eigh`` and two batched products cost a fraction of it (112 matrices of 64 × 4:
    about 2x less; 192 of 4096 × 32: 3x less). On an H100 the two were about as fast (``gesvda`` a little ahead
    for r = 4), so CUDA keeps the spec's driver. Ill-conditioned matrices (see `_GRAM_MIN_EIGENVALUE_RATIO`),
    rank-deficient or non-finite ones included, take the thin SVD as well.
    """
    a = _f32(a)
    if a.is_cuda:
        return _polar_svd(a)
    eigenvalues, q = torch.linalg.eigh(_mT(a) @ a)  # ascending
    out = _times_small(a, (q * eigenvalues.rsqrt().unsqueeze(-2)) @ _mT(q))
    well = eigenvalues[..., 0] >= _GRAM_MIN_EIGENVALUE_RATIO * eigenvalues[..., -1]  # False for NaN too
    if not well.all():
        ill = ~well
        out[ill] = _polar_svd(a[ill])
    return out


def retract_polar(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Polar retraction (the paper's default): polar factor of ``X + Δ``."""
    return polar(_f32(x) + _f32(delta))


def _newton_schulz_correction(x: torch.Tensor) -> torch.Tensor:
    """One Newton–Schulz step towards the polar factor: ``X (3I − XᵀX) / 2`` turns an error ε into O(ε²).

    The exponential map and the Cayley transform keep an exact point on the manifold, but they also keep the
    float32 rounding of the stored ``X``, which then grows linearly over thousands of steps (about 1e-4
    after 1,000 AdamW steps). Polar and QR project and need no correction.
    """
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return _times_small(x, 1.5 * eye - 0.5 * (_mT(x) @ x))


def retract_exp(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Exponential map of the canonical metric (docs/algorithm.md §3.3).

    With ``A = Xᵀ Δ`` and ``Q R = qr(Δ − X A)``: ``X' = [X Q] · expm([[A, −Rᵀ], [R, 0]])[:, :r]``, followed by a
    Newton–Schulz step against accumulated rounding (see `_newton_schulz_correction`).
    """
    x, delta = _f32(x), _f32(delta)
    r = x.shape[-1]
    a = _mT(x) @ delta
    q, rr = torch.linalg.qr(delta - _times_small(x, a))
    top = torch.cat([a, -_mT(rr)], dim=-1)
    bottom = torch.cat([rr, torch.zeros_like(rr)], dim=-1)
    block = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))
    return _newton_schulz_correction(_times_small(torch.cat([x, q], dim=-1), block[..., :, :r]))


def qr_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """Q factor of ``A`` with the signs fixed so that ``diag(R) > 0`` (makes the retraction unique)."""
    a = _f32(a)
    q, rr = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def retract_qr(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """QR retraction ``qf(X + Δ)`` (our addition: cheaper than polar, not in the paper)."""
    return qr_orthonormal(_f32(x) + _f32(delta))


def retract_cayley(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Cayley retraction ``(I − W/2)⁻¹ (I + W/2) X`` with the skew ``W = P Xᵀ − X Pᵀ``, ``P = Δ − X XᵀΔ / 2``.

    ``W X = Δ`` for tangent ``Δ``, and the Cayley transform of a skew matrix is orthogonal, so the result
    is exactly on the manifold. ``W`` has rank ≤ 2r, so the n × n inverse reduces by Woodbury to a
    2r × 2r solve: ``X' = X + L (I − Rᵀ L / 2)⁻¹ Rᵀ X`` with ``L = [P, X]``, ``R = [X, −P]``. A Newton–Schulz
    step removes accumulated rounding (see `_newton_schulz_correction`).
    (Our addition, as in Wen & Yin 2013; not in the paper.)
    """
    x, delta = _f32(x), _f32(delta)
    p = delta - 0.5 * _times_small(x, _mT(x) @ delta)
    left = torch.cat([p, x], dim=-1)
    right = torch.cat([x, -p], dim=-1)
    eye = torch.eye(left.shape[-1], dtype=x.dtype, device=x.device)
    small = eye - 0.5 * (_mT(right) @ left)
    return _newton_schulz_correction(x + _times_small(left, torch.linalg.solve(small, _mT(right) @ x)))


_RETRACTION_FUNCTIONS = {
    "polar": retract_polar,
    "exp": retract_exp,
    "qr": retract_qr,
    "cayley": retract_cayley,
}


def retract(x: torch.Tensor, delta: torch.Tensor, method: Retraction = "polar") -> torch.Tensor:
    """Move from ``X`` along tangent ``Δ`` and land back on the Stiefel manifold."""
    try:
        fn = _RETRACTION_FUNCTIONS[method]
    except KeyError:
        raise ValueError(f"Unknown retraction {method!r}; choose one of {RETRACTIONS}.") from None
    return fn(x, delta)


def riemannian_update(
    x_old: torch.Tensor,
    x_new: torch.Tensor,
    method: Retraction = "polar",
    step_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The post-step of docs/algorithm.md §3.3: scale the optimizer's step, project it, retract it.

    ``step_scale`` multiplies ``Δ = X' − X`` (``1 / sqrt(n / c)`` for gradient scaling); it may be a tensor
    broadcastable to the batch (one factor per matrix).
    """
    x_old = _f32(x_old)
    delta = _f32(x_new) - x_old
    if isinstance(step_scale, torch.Tensor) or step_scale != 1.0:
        delta = delta * step_scale
    return retract(x_old, project_tangent(x_old, delta), method)


def random_stiefel(
    n: int,
    r: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random point of St(n, r) (QR of a Gaussian matrix, signs fixed): uniformly distributed."""
    if r > n:
        raise ValueError(f"rank {r} exceeds the dimension {n}: St({n}, {r}) is empty.")
    g = torch.randn(n, r, generator=generator, dtype=torch.float32, device=device)
    return qr_orthonormal(g).to(dtype)


def orthonormality_error(x: torch.Tensor) -> torch.Tensor:
    """``max |Xᵀ X − I|`` over the last two dimensions (a scalar, in float64 for an honest reading)."""
    x = x.double()
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return (_mT(x) @ x - eye).abs().amax()
