"""The factors of a StelLA adapter outside any layer: their shapes and checks, the scale, the exact LoRA pair, and
which base layers can take an adapter. Shared by the layer, the optimizer, the exports and the loaders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

FACTOR_NAMES = ("stella_U", "stella_S", "stella_Vt")
START_NAMES = ("stella_U0", "stella_S0", "stella_Vt0")

# quantized linear layers subclass nn.Linear (bitsandbytes) or keep integer weights: recognised without importing
# their packages
_QUANTIZED_CLASS_NAMES = ("Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "Params4bit", "Int8Params")
_QUANTIZATION_PACKAGES = ("bitsandbytes", "hqq", "auto_gptq", "gptqmodel", "awq", "optimum", "eetq", "torchao")


def times_s(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``U S`` for a full (r × r) or a diagonal (r values) ``S``."""
    return u * s if s.ndim == 1 else u @ s


def s_times(s: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """``S Vᵀ`` (r × in) for a full (r × r) or a diagonal (r values) ``S``."""
    return s[:, None] * vt if s.ndim == 1 else s @ vt


def stella_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The scale ``s = alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised scaling (rsLoRA).

    Args:
        alpha: the scale numerator.
        r: the adapter's rank.
        use_rslora: rank-stabilised scaling.
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def apply_scale(t: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s · t``: the one place the scale is applied (forward pass, ``ΔW``, LoRA export).

    α = r (scale 1, the paper's text-to-image setting) needs no multiplication, forward or backward.
    """
    return t if scaling == 1.0 else scaling * t


def lora_pair(state: Mapping[str, torch.Tensor], scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact 2-D LoRA pair ``(lora_A, lora_B)`` of a native state (`StellaLayer.native_state`), in float32.

    ``lora_A = Vt`` (r × in) and ``lora_B = s · U S`` (out × r), so ``lora_B @ lora_A = ΔW`` with LoRA alpha = r
    (docs/algorithm.md §4). With a frozen start the pair is the rank-2r ``[Vt; Vt₀]``, ``[s U S, −s U₀ S₀]``
    (``ΔW − ΔW₀`` exactly). Also what converts a native checkpoint file without building layers.

    Args:
        state: ``stella_U``, ``stella_S``, ``stella_Vt`` (and ``stella_U0`` ... for a function-preserving start).
        scaling: ``s`` (`stella_scaling`).
    """
    u, s, vt = (state[name].float() for name in FACTOR_NAMES)
    a, b = vt, apply_scale(times_s(u, s), scaling)
    if START_NAMES[0] in state:
        u0, s0, vt0 = (state[name].float() for name in START_NAMES)
        a = torch.cat([a, vt0], dim=0)
        b = torch.cat([b, -apply_scale(times_s(u0, s0), scaling)], dim=1)
    return a, b


def _is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    names = {type(layer).__name__, type(weight).__name__}
    packages = {type(layer).__module__.split(".")[0], type(weight).__module__.split(".")[0]}
    return (
        bool(names & set(_QUANTIZED_CLASS_NAMES))
        or bool(packages & set(_QUANTIZATION_PACKAGES))
        or (isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point)
    )


def layer_dims(base: nn.Module, name: str = "") -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer StelLA can adapt; one clear error naming the layer otherwise.

    Args:
        base: the layer to adapt (not a peft wrapper).
        name: its module path, for the error message.
    """
    where = f"`{name}` ({type(base).__module__}.{type(base).__qualname__})" if name else type(base).__qualname__
    if _is_quantized(base):
        raise TypeError(
            f"StelLA cannot adapt the quantized layer {where}: U S Vᵀ is merged into, initialised from and exported "
            "against a floating-point weight. Load this layer unquantized or leave it out of `target_modules`."
        )
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return tuple(base.weight.shape)
    if isinstance(base, nn.Conv2d):
        if base.kernel_size != (1, 1) or base.groups != 1:
            raise ValueError(
                f"StelLA supports only 1x1 Conv2d with groups=1 (a linear map over channels); {where} has kernel "
                f"{base.kernel_size}, groups {base.groups}."
            )
        return base.in_channels, base.out_channels
    raise TypeError(
        f"StelLA cannot adapt {where}: use torch.nn.Linear, transformers' Conv1D or a 1x1 torch.nn.Conv2d."
    )


def native_state_shapes(
    in_features: int, out_features: int, r: int, *, diag_s: bool, function_preserving: bool
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of an adapter's native state (`StellaLayer.native_state`) on an out × in layer.

    Args:
        in_features: the layer's input width.
        out_features: the layer's output width.
        r: the adapter's rank.
        diag_s: whether ``S`` is stored as r values.
        function_preserving: whether the frozen start is part of the state.
    """
    shapes = dict(zip(FACTOR_NAMES, ((out_features, r), (r,) if diag_s else (r, r), (r, in_features)), strict=True))
    if function_preserving:
        shapes.update({start: shapes[name] for name, start in zip(FACTOR_NAMES, START_NAMES, strict=True)})
    return shapes


def _rank(key: str, shape: tuple[int, ...]) -> int:
    # U is (out, r); S and Vt start with r
    return shape[-1] if key in ("stella_U", "stella_U0") else shape[0]


def check_native_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise one clear ``ValueError`` unless ``state`` has exactly the tensors and shapes of ``expected``.

    Args:
        state: a native state, ``{"stella_U": ..., ...}``.
        expected: the shapes it must have (`native_state_shapes` or `StellaLayer.native_shapes`).
        where: the module the state is for, for the message.
    """
    if state.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(
            f"The StelLA state of `{where}` does not fit the adapter: missing {missing}, unexpected {unexpected} "
            "(a function-preserving start is saved as stella_U0 / stella_S0 / stella_Vt0 only when the config has "
            "`function_preserving=True`)."
        )
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape:
            raise ValueError(
                f"Shape mismatch for `{where}.{key}`: checkpoint {got}, model {shape} "
                f"(checkpoint rank {_rank(key, got)}, model rank {_rank(key, shape)})."
            )


class StiefelFactor(NamedTuple):
    """A factor the Riemannian optimizer keeps orthonormal.

    ``shape`` is the shape of the whole matrix (a sharded parameter has another); ``transposed`` says that the
    parameter stores the tall n × r matrix transposed (``Vt``, r × in), so the tall matrix is ``param.T``.
    """

    param: nn.Parameter
    shape: tuple[int, int]
    transposed: bool

    def tall(self) -> torch.Tensor:
        """The factor as the tall n × r matrix with orthonormal columns (a view)."""
        return self.param.T if self.transposed else self.param
