"""The manifold math against independent float64 computations of the spec's formulas."""

import numpy as np
import pytest
import scipy.linalg
import torch

from stella_diffusion import manifold

from ._devices import DEVICES, needs_cuda

SHAPES = [(3, 40, 4), (2, 16, 16), (5, 9, 1)]


def _stiefel(batch: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([manifold.random_stiefel(n, r, generator=g) for _ in range(batch)])


def _tangent(x: torch.Tensor, seed: int = 1, size: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return manifold.project_tangent(x, size * torch.randn(x.shape, generator=g))


def _is_tangent(x: torch.Tensor, d: torch.Tensor, tol: float = 1e-5) -> bool:
    m = x.transpose(-2, -1) @ d
    return bool((m + m.transpose(-2, -1)).abs().max() < tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_stiefel_is_orthonormal(shape):
    assert manifold.orthonormality_error(_stiefel(*shape)) < 1e-6


def test_random_stiefel_rejects_rank_above_dimension():
    with pytest.raises(ValueError, match="exceeds"):
        manifold.random_stiefel(3, 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_riemannian_gradient_is_tangent_and_matches_formula(shape):
    x = _stiefel(*shape)
    g = torch.randn(shape)
    rg = manifold.riemannian_gradient(x, g)
    assert _is_tangent(x, rg)
    xd, gd = x.double().numpy(), g.double().numpy()
    expected = gd - xd @ (np.swapaxes(gd, -1, -2) @ xd)
    np.testing.assert_allclose(rg.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_tangent_projection_is_idempotent_and_tangent(shape):
    x = _stiefel(*shape)
    d = manifold.project_tangent(x, torch.randn(shape))
    assert _is_tangent(x, d)
    torch.testing.assert_close(manifold.project_tangent(x, d), d, atol=1e-5, rtol=0)


def _reference(method: str, x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The spec's formulas, one matrix at a time, in float64 with numpy / scipy."""
    n, r = x.shape
    if method == "polar":
        p, _, qt = np.linalg.svd(x + d, full_matrices=False)
        return p @ qt
    if method == "exp":
        a = x.T @ d
        q, rr = np.linalg.qr(d - x @ a)
        block = np.block([[a, -rr.T], [rr, np.zeros((r, r))]])
        return np.hstack([x, q]) @ scipy.linalg.expm(block)[:, :r]
    if method == "qr":
        q, rr = np.linalg.qr(x + d)
        return q * np.sign(np.diag(rr))
    if method == "cayley":
        p = d - 0.5 * x @ (x.T @ d)
        w = p @ x.T - x @ p.T
        eye = np.eye(n)
        return np.linalg.solve(eye - 0.5 * w, (eye + 0.5 * w) @ x)
    raise AssertionError(method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", manifold.RETRACTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_retraction_matches_float64_reference_and_stays_on_manifold(method, shape, device):
    x = _stiefel(*shape)
    d = _tangent(x)
    got = manifold.retract(x.to(device), d.to(device), method)
    assert manifold.orthonormality_error(got) < 2e-6
    got = got.cpu()
    for i in range(shape[0]):
        expected = _reference(method, x[i].double().numpy(), d[i].double().numpy())
        np.testing.assert_allclose(got[i].numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("method", manifold.RETRACTIONS)
def test_retraction_of_zero_step_is_identity(method):
    x = _stiefel(2, 12, 3)
    torch.testing.assert_close(manifold.retract(x, torch.zeros_like(x), method), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", manifold.RETRACTIONS)
def test_retractions_agree_to_first_order(method):
    """Every retraction is R(X, tΔ) = X + tΔ + O(t²)."""
    x = _stiefel(1, 20, 3)
    d = _tangent(x, size=1.0)
    t = 1e-3
    moved = manifold.retract(x.double(), t * d.double(), method)
    assert (moved - x.double() - t * d.double()).abs().max() < 10 * t**2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", manifold.RETRACTIONS)
def test_batched_equals_one_at_a_time(method, device):
    x = _stiefel(6, 24, 4).to(device)
    d = _tangent(x.cpu()).to(device)
    batched = manifold.retract(x, d, method)
    single = torch.stack([manifold.retract(x[i], d[i], method) for i in range(6)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_riemannian_update_scales_projects_and_retracts():
    x = _stiefel(2, 30, 4)
    step = 0.1 * torch.randn(x.shape)
    got = manifold.riemannian_update(x, x + step, "polar", step_scale=0.5)
    expected = manifold.retract_polar(x, manifold.project_tangent(x, 0.5 * step))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_low_precision_inputs_are_computed_in_float32():
    x = _stiefel(1, 16, 4).bfloat16()
    assert manifold.riemannian_gradient(x, torch.randn(x.shape, dtype=torch.bfloat16)).dtype == torch.float32
    assert manifold.retract(x, torch.zeros_like(x)).dtype == torch.float32


def test_unknown_retraction_is_rejected():
    x = _stiefel(1, 8, 2)
    with pytest.raises(ValueError, match="Unknown retraction"):
        manifold.retract(x, x, "householder")


def _polar_reference(a: torch.Tensor) -> np.ndarray:
    p, _, qt = np.linalg.svd(a.double().numpy(), full_matrices=False)
    return p @ qt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 64, 4), (3, 4096, 32), (4, 9, 1)])
def test_polar_of_training_sized_steps_matches_float64_svd(shape, device):
    """On steps the size an optimizer takes (Gram route on CPU, ``gesvda`` on CUDA): equal to the SVD polar
    factor, orthonormal."""
    x = _stiefel(*shape)
    a = x + _tangent(x, size=1e-3)
    got = manifold.polar(a.to(device))
    assert manifold.orthonormality_error(got) < 1e-5
    np.testing.assert_allclose(got.cpu().numpy(), _polar_reference(a), atol=2e-6)


@needs_cuda
@pytest.mark.gpu
def test_cuda_polar_takes_cusolvers_gesvda_driver(monkeypatch):
    seen = []
    svd = torch.linalg.svd

    def recording_svd(*args, **kwargs):
        seen.append(kwargs.get("driver"))
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    x = _stiefel(8, 4096, 32).cuda()
    manifold.retract(x, _tangent(x.cpu(), size=1e-3).cuda(), "polar")
    assert seen == ["gesvda"]


def test_ill_conditioned_matrices_and_only_those_take_the_svd(monkeypatch):
    x = _stiefel(5, 30, 4)
    a = x + _tangent(x, size=0.1)
    a[1, :, 2] *= 1e-3  # κ ≈ 1e3
    a[3] = x[3] @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.4]))  # κ = 2.5: just past the threshold
    seen = []

    def recording_svd(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0])
        return polar_svd(t)

    polar_svd = manifold._polar_svd
    monkeypatch.setattr(manifold, "_polar_svd", recording_svd)
    got = manifold.polar(a)
    assert seen == [2]
    np.testing.assert_allclose(got.numpy(), _polar_reference(a), atol=2e-6)
    monkeypatch.setattr(manifold, "_polar_svd", polar_svd)
    for i in range(5):  # one matrix at a time takes the same route
        np.testing.assert_allclose(manifold.polar(a[i]).numpy(), _polar_reference(a[i]), atol=2e-6)
