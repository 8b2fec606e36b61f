"""Any optimizer made Riemannian: orthonormality, the exact update rule, skipped steps, accelerate, amp."""

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from stella_diffusion import (
    RETRACTIONS,
    StellaConfig,
    create_stella_optimizer,
    make_riemannian,
    manifold,
    stella_parameter_groups,
    stiefel_parameters,
)

from ._devices import DEVICES


def _regression_model(**config) -> nn.Module:
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    return get_peft_model(net, StellaConfig(target_modules=["0", "2", "4"], **{"r": 3, **config}))


def _task(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 10, generator=g)
    return x, torch.sin(x[:, :3]) + 0.5 * x[:, 3:6]


def _max_error(model: nn.Module) -> float:
    tall = [p.detach().T if p.shape[0] < p.shape[1] else p.detach() for p in stiefel_parameters(model)]
    return float(max(manifold.orthonormality_error(t) for t in tall))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("retraction", RETRACTIONS)
def test_thousand_adamw_steps_stay_orthonormal_and_learn(retraction, device):
    model = _regression_model(retraction=retraction).to(device)
    opt = create_stella_optimizer(model, torch.optim.AdamW, lr=5e-3, weight_decay=0.01)
    x, y = (t.to(device) for t in _task())
    losses = []
    for _ in range(1000):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert _max_error(model) <= 1e-5
    assert opt.stella.orthonormality_error() <= 1e-5
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_one_sgd_step_equals_the_spec_written_out():
    """Pre-step Riemannian gradient, SGD step, scaling 1/sqrt(n/c), projection, polar retraction."""
    model = _regression_model(grad_scaling=16.0)
    opt = torch.optim.SGD(stella_parameter_groups(model), lr=0.1)
    make_riemannian(opt, model)
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    layer = model.base_model.model[2]  # 32 -> 32: U and V are 32 x 3
    u, g = layer.stella_U["default"].detach().double().clone(), layer.stella_U["default"].grad.double().clone()
    opt.step()
    rg = g - u @ (g.T @ u)
    delta = (-0.1 * rg) / (32 / 16) ** 0.5
    delta = delta - u @ (0.5 * (u.T @ delta + delta.T @ u))
    p, _, qt = torch.linalg.svd(u + delta, full_matrices=False)
    torch.testing.assert_close(layer.stella_U["default"].detach().double(), p @ qt, atol=1e-6, rtol=0)


def test_s_is_updated_euclidean_and_uv_leave_weight_decay():
    model = _regression_model()
    groups = stella_parameter_groups(model, weight_decay=0.1)
    constrained = {id(p) for p in stiefel_parameters(model)}
    assert {id(p) for p in groups[0]["params"]} == constrained and groups[0]["weight_decay"] == 0.0
    assert groups[1]["weight_decay"] == 0.1 and all(id(p) not in constrained for p in groups[1]["params"])
    with pytest.warns(UserWarning, match="weight decay"):
        make_riemannian(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), model)


def test_nan_gradient_skips_the_step_and_keeps_the_factors():
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.AdamW, lr=1e-2)
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    nn.functional.mse_loss(model(x), y).backward()
    stiefel_parameters(model)[0].grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="Non-finite"):
        opt.step()
    assert opt.stella.last_step_skipped and opt.stella.skipped_steps == 1
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n], atol=0, rtol=0)
    assert _max_error(model) <= 1e-5
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # training goes on
    assert not opt.stella.last_step_skipped


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_step_with_a_closure_is_refused_and_changes_nothing(how):
    """A closure's backward would overwrite the Riemannian gradients the pre-step hook has just made."""
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=0.1)
    x, y = _task(16)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [p.grad.clone() for p in stiefel_parameters(model)]
    with pytest.raises(RuntimeError, match=r"cannot take `step\(closure\)`"):
        opt.step(closure) if how == "positional" else opt.step(closure=closure)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert all(torch.equal(p.grad, g) for p, g in zip(stiefel_parameters(model), grads, strict=True))
    opt.step()  # without a closure it steps as usual
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert _max_error(model) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_overflow_retracts_nothing(device):
    model = _regression_model().to(device)
    opt = create_stella_optimizer(model, torch.optim.AdamW, lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x, y = (t.to(device) for t in _task(16))
    before = [p.detach().clone() for p in stiefel_parameters(model)]
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    stiefel_parameters(model)[1].grad.fill_(float("inf"))
    scaler.step(opt)
    scaler.update()
    for p, b in zip(stiefel_parameters(model), before, strict=True):
        torch.testing.assert_close(p.detach(), b, atol=0, rtol=0)
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(p.detach(), b) for p, b in zip(stiefel_parameters(model), before, strict=True))
    assert _max_error(model) <= 1e-5


def test_optimizer_prepared_by_accelerate():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _regression_model()
    opt = torch.optim.AdamW(stella_parameter_groups(model), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    hooks = make_riemannian(opt, model)  # the AcceleratedOptimizer wrapper is seen through
    x, y = _task(32)
    first = None
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert hooks.orthonormality_error() <= 1e-5


def test_gradient_scaling_width():
    """True: the config's hidden_size, else the median tall dimension; a float sets c; False is off."""
    model = _regression_model()  # tall dimensions: 10, 32, 32, 32, 32, 3 -> median 32
    scales = {max(f.param.shape): f.step_scale for f in make_riemannian(
        torch.optim.SGD(stella_parameter_groups(model), lr=0.1), model).factors}
    assert scales[32] == 1.0 and scales[10] == pytest.approx((10 / 32) ** -0.5)
    hooks = make_riemannian(torch.optim.SGD(stella_parameter_groups(model), lr=0.1), model, grad_scaling=8.0)
    assert {max(f.param.shape): f.step_scale for f in hooks.factors}[32] == pytest.approx(0.5)
    hooks = make_riemannian(torch.optim.SGD(stella_parameter_groups(model), lr=0.1), model, grad_scaling=False)
    assert all(f.step_scale == 1.0 for f in hooks.factors)

    class WithConfig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Cfg", (), {"hidden_size": 10})()
            self.lin = nn.Linear(10, 40)

    hidden = get_peft_model(WithConfig(), StellaConfig(r=2, target_modules=["lin"]))
    hooks = make_riemannian(torch.optim.SGD(stella_parameter_groups(hidden), lr=0.1), hidden)
    assert {max(f.param.shape): f.step_scale for f in hooks.factors} == {40: pytest.approx(0.5), 10: 1.0}


def test_remove_makes_the_optimizer_euclidean_again():
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=0.5)
    opt.stella.remove()
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert _max_error(model) > 1e-3


def test_optimizer_without_stella_parameters_is_rejected():
    model = _regression_model()
    with pytest.raises(ValueError, match="no StelLA"):
        make_riemannian(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), model)


def test_steps_without_gradients_for_some_factors():
    """A factor that received no gradient this step is neither stepped nor retracted."""
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=0.1)
    first = model.base_model.model[0]
    x, y = _task(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.functional.mse_loss(model(x), y).backward()
        first.stella_U["default"].grad = None
        before = first.stella_U["default"].detach().clone()
        opt.step()
    torch.testing.assert_close(first.stella_U["default"].detach(), before, atol=0, rtol=0)


def test_factors_of_one_shape_with_different_gradient_scales_share_a_batch():
    """Two models with different reference widths in one optimizer: each factor is scaled by its own c."""
    torch.manual_seed(0)
    first = _regression_model()  # tall dims 10, 32, 32, 32, 32, 3: c = 32
    second = get_peft_model(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64)),
                            StellaConfig(target_modules=["0", "2"], r=3))  # tall dims 64, 32, 64, 64: c = 64
    opt = torch.optim.SGD([*stella_parameter_groups(first), *stella_parameter_groups(second)], lr=0.1)
    hooks = make_riemannian(opt, [first, second])
    x, y = _task(16)
    loss = nn.functional.mse_loss(first(x), y) + second(torch.randn(16, 32)).square().mean()
    loss.backward()
    def tall(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().T if t.shape[0] < t.shape[1] else t.detach().double()

    before = [(f, tall(f.param), tall(f.param.grad)) for f in hooks.factors]
    assert len({f.step_scale for f in hooks.factors if max(f.param.shape) == 32}) == 2  # in one (32, 3) batch
    opt.step()
    for f, u, g in before:
        delta = -0.1 * (g - u @ (g.T @ u)) * f.step_scale
        delta = delta - u @ (0.5 * (u.T @ delta + delta.T @ u))
        p, _, qt = torch.linalg.svd(u + delta, full_matrices=False)
        torch.testing.assert_close(tall(f.param), p @ qt, atol=1e-6, rtol=0)


def test_orthonormality_error_is_the_largest_over_all_factors():
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=0.1)
    with torch.no_grad():
        stiefel_parameters(model)[3].add_(1e-3)
    assert opt.stella.orthonormality_error() == pytest.approx(_max_error(model), rel=1e-12)


def test_parameters_added_to_the_optimizer_later_are_checked_too():
    """The step's plan is rebuilt when the optimizer's parameters change: a NaN there still skips the step."""
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=0.1)
    extra = nn.Parameter(torch.zeros(3))
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    opt.add_param_group({"params": [extra]})
    nn.functional.mse_loss(model(x) + extra, y).backward()
    extra.grad[0] = float("inf")
    with pytest.warns(UserWarning, match="Non-finite"):
        opt.step()
    assert opt.stella.last_step_skipped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nan_in", ["S", "U"])
def test_bfloat16_training_steps_and_skips_non_finite_steps(nan_in, device):
    """bfloat16 gradients take the plain finite check (GradScaler's fused kernel lacks them on CUDA)."""
    model = _regression_model().to(device, torch.bfloat16)
    opt = create_stella_optimizer(model, torch.optim.AdamW, lr=1e-2)
    x, y = (t.to(device) for t in _task(16))
    for _ in range(3):
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        opt.step()
        opt.zero_grad()
    assert not opt.stella.last_step_skipped and _max_error(model) < 2e-2  # bfloat16 keeps ~3 digits
    nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
    layer = model.base_model.model[2]
    (layer.stella_S if nan_in == "S" else layer.stella_U)["default"].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with pytest.warns(UserWarning, match="Non-finite"):
        opt.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("retraction", ["exp", "cayley"])
def test_a_retraction_that_leaves_the_manifold_falls_back_to_polar(retraction):
    """An absurd step (SGD at lr 1e6): the exp map / Cayley result is off the manifold, polar is used instead."""
    model = _regression_model(retraction=retraction)
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=1e6)
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.warns(UserWarning, match=f"The {retraction} retraction left the manifold"):
        opt.step()
    assert _max_error(model) <= 1e-5 and not opt.stella.last_step_skipped


def test_a_step_whose_retraction_is_not_finite_leaves_the_factors_unchanged(monkeypatch):
    model = _regression_model()
    opt = create_stella_optimizer(model, torch.optim.SGD, lr=1e-2)
    x, y = _task(16)
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in stiefel_parameters(model)]
    monkeypatch.setattr(manifold, "riemannian_update", lambda x_old, *args, **kwargs: x_old * float("nan"))
    with pytest.warns(UserWarning, match="not finite"):
        opt.step()
    assert opt.stella.last_step_skipped and opt.stella.skipped_steps == 1
    for param, old in zip(stiefel_parameters(model), before, strict=True):
        torch.testing.assert_close(param.detach(), old, atol=0, rtol=0)
