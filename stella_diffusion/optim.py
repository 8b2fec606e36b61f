"""Any torch optimizer made Riemannian for StelLA's Stiefel factors (docs/algorithm.md §3).

`make_riemannian(optimizer, model)` registers torch's public step pre/post hooks on the optimizer:

1. before the step, each ``U`` / ``V`` gradient becomes the Riemannian gradient ``G − X Gᵀ X`` (and ``X`` is
   remembered);
2. the wrapped optimizer (AdamW, SGD, ...) steps as it would;
3. after the step, the change ``Δ = X' − X`` is scaled by ``1 / sqrt(n / c)``, projected onto the tangent
   space and retracted onto the manifold, one batched call per shape.

Because the hooks live inside ``optimizer.step()``, this works unchanged under accelerate's
`AcceleratedOptimizer` and with a `GradScaler` (an overflowing step never calls ``step()``, so nothing is
retracted). Non-finite gradients without a scaler skip the step with a warning.
"""

from __future__ import annotations

import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import manifold
from .factor_batches import Batch, Factor, batches
from .tuner import StellaConfig, StellaLayer
from .tuner.factors import StiefelFactor

# A retraction's result farther than this from the manifold (max |XᵀX − I|, float32) is not written.
_RETRACTION_TOLERANCE = 1e-3


def _gram_error(x: torch.Tensor) -> torch.Tensor:
    """``max |XᵀX − I|`` of a float32 (k, n, r) stack, in float32 (a cheap guard, not the logged error)."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return (x.mT @ x - eye).abs().amax()


# GradScaler's fused finite check takes these on every device (bfloat16 only on CPU)
_FUSED_CHECK_DTYPES = (torch.float32, torch.float16)


@dataclass
class _Plan:
    """How a step's work is laid out: the factors in batches, and every other parameter of the optimizer.

    Grouping 100+ parameters anew each step costs more than the retraction arithmetic of a small model, so the
    plan is kept while what `RiemannianHooks._layout` reads stays the same: parameters added to the optimizer,
    or the model moved to another device or dtype (as accelerate's ``prepare`` does), make a new one.
    """

    layout: tuple
    batches: list[Batch]
    fused_check: dict[torch.device, list[nn.Parameter]]  # other parameters whose dtype the fused check takes
    plain_check: list[nn.Parameter]  # the remaining ones (bfloat16, float64)


def _unwrap_model(model: nn.Module) -> nn.Module:
    # DDP / accelerate wrap the model in `.module`; the StelLA layers are found either way, the config is not
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (a torch Optimizer subclass without hook state) keeps the real one in
    # `.optimizer`; the hooks must go on the real one, whose step() the wrapper calls
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Expected a torch optimizer (or a wrapper of one); got {type(optimizer).__name__}.")
    return optimizer


def stella_layers(model: nn.Module) -> Iterable[StellaLayer]:
    """Every StelLA layer of a model (PeftModel, diffusers model with an adapter, or DDP-wrapped)."""
    return (m for m in model.modules() if isinstance(m, StellaLayer))


def stiefel_factors(model: nn.Module) -> list[StiefelFactor]:
    """The constrained ``U`` and ``Vt`` of every adapter of ``model``, with their shapes and orientation.

    Args:
        model: a model with StelLA adapters (PeftModel, diffusers / transformers model, DDP-wrapped).
    """
    return [f for layer in stella_layers(model) for a in layer.stella_adapters for f in layer.stiefel_factors(a)]


def stiefel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The constrained ``U`` and ``Vt`` parameters of every adapter of ``model``."""
    return [f.param for f in stiefel_factors(model)]


def stella_config(model: nn.Module) -> StellaConfig | None:
    """The model's StelLA config (PeftModel and diffusers' PeftAdapterMixin both keep ``peft_config``)."""
    configs = getattr(_unwrap_model(model), "peft_config", None) or {}
    return next((c for c in configs.values() if isinstance(c, StellaConfig)), None)


def stella_parameter_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups with the Stiefel factors excluded from weight decay (docs/algorithm.md §3).

    Weight decay would pull ``U`` and ``V`` off the manifold only to be undone by the retraction; ``S`` and
    any other trainable parameter keep ``weight_decay``.
    """
    constrained = {id(p) for p in stiefel_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in constrained], "weight_decay": 0.0},
        {"params": [p for p in trainable if id(p) not in constrained], "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def _reference_width(model: nn.Module, tall_dims: Sequence[int], grad_scaling: bool | float) -> float | None:
    """``c`` of the gradient scaling: the given width, the model's ``hidden_size``, else the median tall dim."""
    if grad_scaling is False:
        return None
    if grad_scaling is not True:
        return float(grad_scaling)
    config = getattr(_unwrap_model(model), "config", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int) and hidden > 0:
        return float(hidden)
    return float(statistics.median(tall_dims)) if tall_dims else None


class RiemannianHooks:
    """The state of one Riemannian optimizer: its constrained factors and its step hooks.

    Returned by `make_riemannian`; keep it (it is also stored as ``optimizer.stella``). ``remove()`` turns the
    optimizer back into a Euclidean one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        models: Sequence[nn.Module],
        retraction: str,
        grad_scaling: bool | float,
    ) -> None:
        if retraction not in manifold.RETRACTIONS:
            raise ValueError(f"Unknown retraction {retraction!r}; choose one of {manifold.RETRACTIONS}.")
        self.optimizer = optimizer
        self.retraction = retraction
        self.factors = self._collect_factors(optimizer, models, grad_scaling)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._plan: _Plan | None = None
        # the batches of the step under way and their values before it, from the pre- to the post-step hook
        self._stepped: list[tuple[Batch, torch.Tensor]] = []
        self._found_inf: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (flag, 1.0) per device
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @staticmethod
    def _collect_factors(
        optimizer: torch.optim.Optimizer, models: Sequence[nn.Module], grad_scaling: bool | float
    ) -> list[Factor]:
        in_optimizer = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        factors: list[Factor] = []
        for model in models:
            pairs = []
            for factor in stiefel_factors(model):
                param = factor.param
                if id(param) not in in_optimizer:
                    continue
                if _is_sharded(param) or tuple(param.shape) != factor.shape:
                    raise RuntimeError(
                        f"A StelLA factor of expected shape {factor.shape} is sharded (FSDP / DeepSpeed / tensor "
                        "parallel). U and V must be whole on the rank that retracts them: use DDP; FSDP and "
                        "DeepSpeed are not supported."
                    )
                if in_optimizer[id(param)].get("weight_decay", 0.0):
                    warnings.warn(
                        "A StelLA U/V factor is in a parameter group with weight decay; the spec excludes them. "
                        "Build the groups with `stella_parameter_groups`.",
                        stacklevel=4,
                    )
                pairs.append((param, factor.transposed))
            tall_dims = [max(p.shape) for p, _ in pairs]
            width = _reference_width(model, tall_dims, grad_scaling)
            for param, transposed in pairs:
                n = max(param.shape)
                scale = 1.0 if width is None or n == width else (n / width) ** -0.5
                factors.append(Factor(param, transposed, scale))
        if not factors:
            raise ValueError(
                "The optimizer holds no StelLA U/V parameters of the given model(s): add the adapter with "
                "`get_peft_model(model, StellaConfig(...))` (or `add_adapter`) before creating the optimizer."
            )
        return factors

    def _layout(self) -> tuple:
        first = self.factors[0].param
        return tuple(len(group["params"]) for group in self.optimizer.param_groups), first.device, first.dtype

    def _current_plan(self) -> _Plan:
        layout = self._layout()
        if self._plan is None or self._plan.layout != layout:
            constrained = {id(f.param) for f in self.factors}
            fused: dict[torch.device, list[nn.Parameter]] = defaultdict(list)
            plain = []
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in constrained:
                        (fused[p.device] if p.dtype in _FUSED_CHECK_DTYPES else plain).append(p)
            self._plan = _Plan(layout, batches(self.factors), dict(fused), plain)
        return self._plan

    def _all_grads_finite(self, fused: dict[torch.device, list[torch.Tensor]], plain: list[torch.Tensor]) -> bool:
        """Whether every tensor is finite: one fused check per device (GradScaler's kernel) for the float32 /
        float16 ones, one over their concatenation for the rest, and one host sync per device."""
        flags = []
        for device, group in fused.items():
            if device not in self._found_inf:
                self._found_inf[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
            found_inf, one = self._found_inf[device]
            # flags inf / NaN in every tensor; "unscaling" by 1.0 leaves the values as they are
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf.zero_(), one)
            flags.append(found_inf)
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for t in plain:
            by_device[t.device].append(t.reshape(-1))
        flags += [torch.cat(group).isfinite().logical_not().any() for group in by_device.values()]
        return not any(bool(flag) for flag in flags)

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # torch hands the hook step's own arguments: (optimizer, closure) or closure=...
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "A Riemannian StelLA optimizer cannot take `step(closure)`: the closure's backward would overwrite "
                "the Riemannian U/V gradients this step has just made. Call `loss.backward()`, then "
                "`optimizer.step()` (optimizers that need a closure, such as LBFGS, are not supported)."
            )
        self._stepped = []
        plan = self._current_plan()
        work = []  # (batch, its gradients, stacked values, stacked gradients)
        fused: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for batch_grads in map(Batch.with_grads, plan.batches):
            if batch_grads is not None:
                batch, grads = batch_grads
                g = batch.stack(grads)
                work.append((batch, grads, batch.stack(batch.params), g))
                fused[batch.device].append(g)  # float32, and the same numbers as the gradients
        for device, params in plan.fused_check.items():
            fused[device] += [p.grad for p in params if p.grad is not None]
        plain = [p.grad for p in plan.plain_check if p.grad is not None]
        self.last_step_skipped = not self._all_grads_finite(fused, plain)
        if self.last_step_skipped:
            # Dropping every gradient makes torch optimizers leave every parameter (and its state) alone.
            warnings.warn("Non-finite gradients: skipping this optimizer step.", stacklevel=3)
            self.skipped_steps += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        for batch, grads, x, g in work:
            batch.write(grads, manifold.riemannian_gradient(x, g))
            self._stepped.append((batch, x))

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.last_step_skipped:
            return
        steps = [(batch, x_old, batch.stack(batch.params)) for batch, x_old in self._stepped]
        retracted = [manifold.riemannian_update(x_old, x_new, self.retraction, batch.step_scale)
                     for batch, x_old, x_new in steps]
        # one host sync per step: is every result finite and on the manifold? (NaN compares False)
        on_manifold = torch.stack([(_gram_error(y) <= _RETRACTION_TOLERANCE).to(steps[0][1].device)
                                   for y in retracted]) if retracted else None
        if on_manifold is not None and not bool(on_manifold.all()):
            retracted = self._repair(steps, retracted, on_manifold.tolist())
        for (batch, _, _), y in zip(steps, retracted, strict=True):
            batch.write(batch.params, y)
        self._stepped = []

    def _repair(self, steps: list, retracted: list[torch.Tensor], good: list[bool]) -> list[torch.Tensor]:
        """Results off the manifold (an exp / Cayley / QR step too large to compute): polar for this step, and
        where even that fails the factors keep their values from before the step (counted as a skipped step)."""
        repaired = list(retracted)
        for i, ((batch, x_old, x_new), ok) in enumerate(zip(steps, good, strict=True)):
            if ok:
                continue
            y = manifold.riemannian_update(x_old, x_new, "polar", batch.step_scale)
            if self.retraction != "polar" and bool(_gram_error(y) <= _RETRACTION_TOLERANCE):
                warnings.warn(f"The {self.retraction} retraction left the manifold at this step; polar was used "
                              "instead.", stacklevel=4)
            else:
                warnings.warn("The retracted U / V were not finite: this step leaves them unchanged.", stacklevel=4)
                y = x_old
                self.last_step_skipped = True
            repaired[i] = y
        self.skipped_steps += self.last_step_skipped
        return repaired

    @torch.no_grad()
    def orthonormality_error(self) -> float:
        """``max |XᵀX − I|`` over every constrained factor (for logging and tests): one reduction per batch."""
        errors = [
            manifold.orthonormality_error(torch.stack([f.param.T if f.transposed else f.param for f in b.factors]))
            for b in self._current_plan().batches
        ]
        return float(torch.stack([e.to(errors[0].device) for e in errors]).max())

    def remove(self) -> None:
        """Unregister the hooks: the optimizer is plain Euclidean again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _is_sharded(param: torch.Tensor) -> bool:
    if getattr(param, "ds_id", None) is not None:  # DeepSpeed ZeRO-3 partitions parameters
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(param, DTensor)


def make_riemannian(
    optimizer: Any,
    model: nn.Module | Sequence[nn.Module],
    *,
    retraction: str | None = None,
    grad_scaling: bool | float | None = None,
) -> RiemannianHooks:
    """Turn an existing torch optimizer into a Riemannian one for the StelLA factors of ``model``.

    Args:
        optimizer: any `torch.optim.Optimizer`, or a wrapper that keeps one in ``.optimizer`` (accelerate).
        model: the adapted model, or several (e.g. a UNet and a text encoder sharing one optimizer).
        retraction: ``"polar"`` (default), ``"exp"``, ``"qr"`` or ``"cayley"``; default: the model's config.
        grad_scaling: ``True`` (default): ``c`` = the model's ``hidden_size``, else the median tall dimension;
            a float sets ``c``; ``False`` turns it off. Default: the model's config.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    config = next((c for c in map(stella_config, models) if c is not None), None)
    if retraction is None:
        retraction = config.retraction if config is not None else "polar"
    if grad_scaling is None:
        grad_scaling = config.grad_scaling if config is not None else True
    inner = _unwrap_optimizer(optimizer)
    hooks = RiemannianHooks(inner, models, retraction, grad_scaling)
    inner.stella = hooks
    return hooks


def create_stella_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    weight_decay: float = 0.0,
    retraction: str | None = None,
    grad_scaling: bool | float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build ``optimizer_cls`` over the model's trainable parameters and make it Riemannian.

    The shape of peft's ``create_loraplus_optimizer``; U and V are excluded from weight decay. The hooks are
    reachable as ``optimizer.stella``.
    """
    optimizer = optimizer_cls(stella_parameter_groups(model, weight_decay), lr=lr, **kwargs)
    make_riemannian(optimizer, model, retraction=retraction, grad_scaling=grad_scaling)
    return optimizer
