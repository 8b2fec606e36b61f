"""Any torch optimizer made Riemannian for StelLA's Stiefel factors (spec §3).

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
from .tuner import StellaConfig, StellaLayer


@dataclass
class _Factor:
    """One constrained matrix: ``U`` as is, or ``Vt`` read transposed, with its gradient-scaling factor."""

    param: nn.Parameter
    transposed: bool
    step_scale: float

    def tall(self, t: torch.Tensor) -> torch.Tensor:
        return t.T if self.transposed else t


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


def stiefel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The constrained ``U`` and ``Vt`` parameters of every adapter of ``model``."""
    params = []
    for layer in stella_layers(model):
        for adapter in layer.stella_U:
            params += [layer.stella_U[adapter], layer.stella_Vt[adapter]]
    return params


def stella_config(model: nn.Module) -> StellaConfig | None:
    """The model's StelLA config (PeftModel and diffusers' PeftAdapterMixin both keep ``peft_config``)."""
    configs = getattr(_unwrap_model(model), "peft_config", None) or {}
    return next((c for c in configs.values() if isinstance(c, StellaConfig)), None)


def stella_parameter_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups with the Stiefel factors excluded from weight decay (spec §3).

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
        self._before: dict[int, torch.Tensor] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @staticmethod
    def _collect_factors(
        optimizer: torch.optim.Optimizer, models: Sequence[nn.Module], grad_scaling: bool | float
    ) -> list[_Factor]:
        in_optimizer = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        factors: list[_Factor] = []
        for model in models:
            pairs = []
            for layer in stella_layers(model):
                for adapter in layer.stella_U:
                    u, vt = layer.stella_U[adapter], layer.stella_Vt[adapter]
                    for param, expected in ((u, (layer.out_features, layer.r[adapter])),
                                            (vt, (layer.r[adapter], layer.in_features))):
                        if id(param) not in in_optimizer:
                            continue
                        if _is_sharded(param) or tuple(param.shape) != expected:
                            raise RuntimeError(
                                f"A StelLA factor of expected shape {expected} is sharded (FSDP / DeepSpeed / "
                                "tensor parallel). U and V must be whole on the rank that retracts them: use DDP; "
                                "FSDP and DeepSpeed are not supported."
                            )
                        if in_optimizer[id(param)].get("weight_decay", 0.0):
                            warnings.warn(
                                "A StelLA U/V factor is in a parameter group with weight decay; the spec excludes "
                                "them. Build the groups with `stella_parameter_groups`.",
                                stacklevel=4,
                            )
                        pairs.append((param, param is vt))
            tall_dims = [max(p.shape) for p, _ in pairs]
            width = _reference_width(model, tall_dims, grad_scaling)
            for param, transposed in pairs:
                n = max(param.shape)
                scale = 1.0 if width is None or n == width else (n / width) ** -0.5
                factors.append(_Factor(param, transposed, scale))
        if not factors:
            raise ValueError(
                "The optimizer holds no StelLA U/V parameters of the given model(s): add the adapter with "
                "`get_peft_model(model, StellaConfig(...))` (or `add_adapter`) before creating the optimizer."
            )
        return factors

    def _grouped(self, factors: Iterable[_Factor]) -> dict[tuple, list[_Factor]]:
        """Factors of the same tall shape and device are processed as one batch (one SVD call per shape)."""
        groups: dict[tuple, list[_Factor]] = defaultdict(list)
        for f in factors:
            groups[(self._tall_shape(f), f.param.device)].append(f)
        return groups

    @staticmethod
    def _tall_shape(f: _Factor) -> tuple[int, int]:
        rows, cols = f.param.shape
        return (cols, rows) if f.transposed else (rows, cols)

    def _all_grads_finite(self) -> bool:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        # one fused check and one host sync, instead of one per gradient
        return bool(torch.cat([g.reshape(-1) for g in grads]).isfinite().all())

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before.clear()
        self.last_step_skipped = not self._all_grads_finite()
        if self.last_step_skipped:
            # Dropping every gradient makes torch optimizers leave every parameter (and its state) alone.
            warnings.warn("Non-finite gradients: skipping this optimizer step.", stacklevel=3)
            self.skipped_steps += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        for group in self._grouped(f for f in self.factors if f.param.grad is not None).values():
            x = torch.stack([f.tall(f.param) for f in group]).float()
            g = torch.stack([f.tall(f.param.grad) for f in group]).float()
            riemannian = manifold.riemannian_gradient(x, g)
            for i, f in enumerate(group):
                f.param.grad.copy_(f.tall(riemannian[i]))
                self._before[id(f.param)] = x[i]

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.last_step_skipped:
            return
        stepped = [f for f in self.factors if id(f.param) in self._before]
        for group in self._grouped(stepped).values():
            x_old = torch.stack([self._before[id(f.param)] for f in group])
            x_new = torch.stack([f.tall(f.param) for f in group]).float()
            scale = torch.tensor([f.step_scale for f in group], device=x_old.device).view(-1, 1, 1)
            retracted = manifold.riemannian_update(x_old, x_new, self.retraction, scale)
            for i, f in enumerate(group):
                f.param.copy_(f.tall(retracted[i]))
        self._before.clear()

    def orthonormality_error(self) -> float:
        """``max |XᵀX − I|`` over every constrained factor (for logging and tests)."""
        return max(float(manifold.orthonormality_error(f.tall(f.param.detach()))) for f in self.factors)

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
