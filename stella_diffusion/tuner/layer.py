"""StelLA adapter layers: ``y = W x + b + s · U S Vᵀ dropout(x)`` (docs/algorithm.md §1–2).

``U`` (out × r) and ``Vt`` (r × in) are kept orthonormal by the Riemannian optimizer (`stella_diffusion.optim`);
``S`` is free. The three factors read like three linear maps ``in → r → r → out``, so the forward pass never
materialises the out × in product.

The layer is the only code that reads its factors or applies the scale ``s``: the optimizer, the LoRA export and
the native checkpoint go through `StellaLayer.stiefel_factors`, `StellaLayer.lora_factors`,
`StellaLayer.native_state` and `StellaLayer.load_native_state`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..manifold import random_stiefel
from .config import StellaConfig
from .factors import (
    FACTOR_NAMES,
    START_NAMES,
    StiefelFactor,
    apply_scale,
    check_native_state,
    layer_dims,
    lora_pair,
    native_state_shapes,
    s_times,
    stella_scaling,
    times_s,
)


# the trained factors and the frozen start of a function-preserving adapter, as named in state dicts and checkpoints
class StellaLayer(BaseTunerLayer):
    """State and math shared by every StelLA layer type (one entry per adapter name in each dict)."""

    adapter_layer_names = FACTOR_NAMES
    # the frozen initial factors of a function-preserving start (docs/algorithm.md §2): buffers, saved with the adapter
    other_param_names = ("r", "alpha", "scaling", "stella_dropout", *START_NAMES)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.stella_dropout = nn.ModuleDict({})
        self.stella_U = nn.ParameterDict({})
        self.stella_S = nn.ParameterDict({})
        self.stella_Vt = nn.ParameterDict({})
        self.stella_U0 = BufferDict({}, persistent=True)
        self.stella_S0 = BufferDict({}, persistent=True)
        self.stella_Vt0 = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = layer_dims(self.get_base_layer())

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: StellaConfig, **kwargs: Any) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"StelLA rank must be a positive integer; got {r!r}.")
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"StelLA rank {r} exceeds min(in, out) = {min(self.in_features, self.out_features)} of this layer: "
                "U and V cannot have orthonormal columns."
            )
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = stella_scaling(alpha, r, config.use_rslora)
        self.stella_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.stella_U[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.stella_S[adapter_name] = nn.Parameter(torch.empty(r) if config.diag_s else torch.empty(r, r))
        self.stella_Vt[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.reset_stella_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if config.function_preserving:
            for name, start in zip(FACTOR_NAMES, START_NAMES, strict=True):
                factor = getattr(self, name)[adapter_name]
                getattr(self, start)[adapter_name] = (
                    factor.detach().clone()
                    if not factor.is_meta
                    # `low_cpu_mem_usage`: the factors wait on the meta device for the state dict, but peft moves
                    # every buffer of an adapter to the base layer's device, which a meta buffer cannot do; NaN
                    # shows a start that the state dict does not fill
                    else torch.full_like(factor, math.nan, device=self.get_base_layer().weight.device)
                )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @property
    def stella_adapters(self) -> list[str]:
        """The names of the StelLA adapters this layer holds."""
        return list(self.stella_U)

    def _base_weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) float32 matrix, whatever the layer stores."""
        weight = self.get_base_layer().weight.detach().float()
        if isinstance(self.get_base_layer(), Conv1D):
            return weight.T
        return weight.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def reset_stella_parameters(self, adapter_name: str, init_weights: str) -> None:
        """Initialise U, S, V (docs/algorithm.md §2): orthonormal at random, or from the SVD of the base weight;
        S = I, or S = 0 for ``"zero"``."""
        r = self.r[adapter_name]
        u, s, vt = self.stella_U[adapter_name], self.stella_S[adapter_name], self.stella_Vt[adapter_name]
        if init_weights in ("orthonormal", "zero"):
            u.copy_(random_stiefel(self.out_features, r))
            vt.copy_(random_stiefel(self.in_features, r).T)
        elif init_weights in ("svd_major", "svd_minor"):
            left, _, right_t = torch.linalg.svd(self._base_weight_out_in(), full_matrices=False)
            chosen = slice(0, r) if init_weights == "svd_major" else slice(-r, None)
            u.copy_(left[:, chosen])
            vt.copy_(right_t[chosen, :])
        else:
            raise ValueError(f"Unknown StelLA init {init_weights!r}.")
        if init_weights == "zero":
            s.zero_()
        elif s.ndim == 1:
            s.fill_(1.0)
        else:
            s.copy_(torch.eye(r))

    def _has_start(self, adapter: str) -> bool:
        return adapter in self.stella_U0

    def stiefel_factors(self, adapter_name: str) -> tuple[StiefelFactor, StiefelFactor]:
        """``U`` (out × r, tall as stored) and ``Vt`` (r × in, stored transposed) of ``adapter_name``.

        The Riemannian optimizer takes these; the shapes are those of the whole matrices, so a sharded parameter
        can be told apart.

        Args:
            adapter_name: the adapter.
        """
        r = self.r[adapter_name]
        return (
            StiefelFactor(self.stella_U[adapter_name], (self.out_features, r), False),
            StiefelFactor(self.stella_Vt[adapter_name], (r, self.in_features), True),
        )

    @torch.no_grad()
    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact LoRA pair ``(lora_A, lora_B)`` of ``ΔW`` in float32, scale baked into ``lora_B`` (`lora_pair`).

        A 1×1 Conv2d gets peft's 1×1 kernels, (r, in, 1, 1) and (out, r, 1, 1).

        Args:
            adapter_name: the adapter.
        """
        a, b = lora_pair(self.native_state(adapter_name), self.scaling[adapter_name])
        if isinstance(self.get_base_layer(), nn.Conv2d):
            a, b = a[:, :, None, None], b[:, :, None, None]
        return a.contiguous(), b.contiguous()

    def native_shapes(self, adapter_name: str) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor `native_state` returns for ``adapter_name``.

        Args:
            adapter_name: the adapter.
        """
        return native_state_shapes(
            self.in_features,
            self.out_features,
            self.r[adapter_name],
            diag_s=self.stella_S[adapter_name].ndim == 1,
            function_preserving=self._has_start(adapter_name),
        )

    def native_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """U, S, Vt (and the frozen U₀, S₀, Vt₀ of a function-preserving start), detached, as stored.

        Keys are ``stella_U``, ``stella_S``, ``stella_Vt`` (``stella_U0`` ...): what the native checkpoint keeps to
        resume training exactly.

        Args:
            adapter_name: the adapter.
        """
        names = FACTOR_NAMES + (START_NAMES if self._has_start(adapter_name) else ())
        return {name: getattr(self, name)[adapter_name].detach() for name in names}

    @torch.no_grad()
    def load_native_state(self, adapter_name: str, state: Mapping[str, torch.Tensor], where: str = "") -> None:
        """Check ``state`` against this adapter (`check_native_state`) and only then copy it in, bit for bit.

        Args:
            adapter_name: the adapter to overwrite.
            state: a `native_state` of an adapter of the same rank, ``diag_s`` and ``function_preserving``.
            where: the module's name, for error messages.
        """
        check_native_state(state, self.native_shapes(adapter_name), where or type(self).__name__)
        for name, tensor in state.items():
            getattr(self, name)[adapter_name].copy_(tensor)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = s · U S Vᵀ`` (minus ``ΔW₀`` for a function-preserving start), in the base weight's layout."""
        delta = times_s(self.stella_U[adapter], self.stella_S[adapter]) @ self.stella_Vt[adapter]
        if self._has_start(adapter):
            delta = delta - times_s(self.stella_U0[adapter], self.stella_S0[adapter]) @ self.stella_Vt0[adapter]
        delta = apply_scale(delta, self.scaling[adapter])
        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            return delta.T
        return delta.reshape(base.weight.shape)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``ΔW`` of the active (or given) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.stella_U:
                continue
            delta = self.get_delta_weight(name).detach().to(base.weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken.")
                    base.weight.data = merged
                else:
                    base.weight.data.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.stella_U:
                with torch.no_grad():
                    base.weight.data.sub_(self.get_delta_weight(name).detach().to(base.weight.dtype))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether peft's ``convert_to_lora`` gives an exact LoRA of this layer.

        It takes an SVD of `get_delta_weight`, which for a 1×1 Conv2d is a 4-D kernel, and would build factors no
        LoRA layer loads, so Conv2d says no (peft then names this type). `lora_factors` is exact for every layer.
        """
        return not isinstance(self.get_base_layer(), nn.Conv2d)

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``s · U S Vᵀ dropout(x)`` (minus the frozen start), through the layer's own map type.

        ``s · S`` is folded into ``Vᵀ`` first (r × r times r × in, no activation involved), so the input passes
        through two maps, ``in → r → out``, as in LoRA, instead of three plus a scaling. The frozen start acts on
        the same dropped-out input, so a function-preserving adapter is the base model at step 0 in train mode too.
        """
        u, s, vt = self.stella_U[adapter], self.stella_S[adapter], self.stella_Vt[adapter]
        x = self.stella_dropout[adapter](self._cast_input_dtype(x, u.dtype))
        scaling = self.scaling[adapter]
        out = self._apply_factors(x, u, s_times(apply_scale(s, scaling), vt))
        if self._has_start(adapter):
            start = s_times(apply_scale(self.stella_S0[adapter], scaling), self.stella_Vt0[adapter])
            out = out - self._apply_factors(x, self.stella_U0[adapter], start)
        return out


class _StellaModule(nn.Module, StellaLayer):
    """A StelLA layer as an `nn.Module`; subclasses say how the three factors act on an input."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, alpha: float, config: StellaConfig,
                 **kwargs: Any) -> None:
        super().__init__()
        StellaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config)

    def _apply_factors(self, x: torch.Tensor, u: torch.Tensor, svt: torch.Tensor) -> torch.Tensor:
        """``U (S Vᵀ) x`` with the r × in ``S Vᵀ`` already multiplied out."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.stella_U:
                result = result + self._adapter_output(x, adapter).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "stella." + super().__repr__()


class Linear(_StellaModule):
    """StelLA on `nn.Linear` and on transformers' `Conv1D` (GPT-2, weight stored as (in, out))."""

    def _apply_factors(self, x: torch.Tensor, u: torch.Tensor, svt: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, svt), u)


class Conv2d(_StellaModule):
    """StelLA on a 1×1 `nn.Conv2d` (a linear map over channels; the first factor keeps stride and padding)."""

    def _apply_factors(self, x: torch.Tensor, u: torch.Tensor, svt: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        h = F.conv2d(x, svt[:, :, None, None], stride=base.stride, padding=base.padding, dilation=base.dilation)
        return F.conv2d(h, u[:, :, None, None])
