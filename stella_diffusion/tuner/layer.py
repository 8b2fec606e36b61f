"""StelLA adapter layers: ``y = W x + b + s · U S Vᵀ dropout(x)`` (docs/algorithm.md §1–2).

``U`` (out × r) and ``Vt`` (r × in) are kept orthonormal by the Riemannian optimizer (`stella_diffusion.optim`);
``S`` is free. The three factors read like three linear maps ``in → r → r → out``, so the forward pass never
materialises the out × in product.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..manifold import random_stiefel
from .config import StellaConfig


def times_s(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``U S`` for a full (r × r) or a diagonal (r values) ``S``."""
    return u * s if s.ndim == 1 else u @ s


def s_times(s: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """``S Vᵀ`` (r × in) for a full (r × r) or a diagonal (r values) ``S``."""
    return s[:, None] * vt if s.ndim == 1 else s @ vt


def _scaled(s: torch.Tensor, scaling: float) -> torch.Tensor:
    # α = r (scale 1, the paper's text-to-image setting) needs no multiplication, forward or backward
    return s if scaling == 1.0 else scaling * s


class StellaLayer(BaseTunerLayer):
    """State and math shared by every StelLA layer type (one entry per adapter name in each dict)."""

    adapter_layer_names = ("stella_U", "stella_S", "stella_Vt")
    # the frozen initial factors of a function-preserving start (docs/algorithm.md §2): buffers, saved with the adapter
    other_param_names = ("r", "alpha", "scaling", "stella_dropout", "stella_U0", "stella_S0", "stella_Vt0")

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

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.groups != 1:
                raise ValueError(
                    f"StelLA supports only 1x1 Conv2d with groups=1 (a linear map over channels); got kernel "
                    f"{base.kernel_size}, groups {base.groups}."
                )
            self.in_features, self.out_features = base.in_channels, base.out_channels
        else:
            raise TypeError(f"StelLA cannot adapt a layer of type {type(base).__name__}.")

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
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.stella_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.stella_U[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.stella_S[adapter_name] = nn.Parameter(torch.empty(r) if config.diag_s else torch.empty(r, r))
        self.stella_Vt[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.reset_stella_parameters(adapter_name, config.init_weights)
        if config.function_preserving:
            self.stella_U0[adapter_name] = self.stella_U[adapter_name].detach().clone()
            self.stella_S0[adapter_name] = self.stella_S[adapter_name].detach().clone()
            self.stella_Vt0[adapter_name] = self.stella_Vt[adapter_name].detach().clone()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _base_weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) float32 matrix, whatever the layer stores."""
        weight = self.get_base_layer().weight.detach().float()
        if isinstance(self.get_base_layer(), Conv1D):
            return weight.T
        return weight.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def reset_stella_parameters(self, adapter_name: str, init_weights: str) -> None:
        """Initialise U, S, V (docs/algorithm.md §2): orthonormal at random, or from the SVD of the base weight."""
        r = self.r[adapter_name]
        u, s, vt = self.stella_U[adapter_name], self.stella_S[adapter_name], self.stella_Vt[adapter_name]
        if init_weights == "orthonormal":
            u.copy_(random_stiefel(self.out_features, r))
            vt.copy_(random_stiefel(self.in_features, r).T)
        elif init_weights in ("svd_major", "svd_minor"):
            left, _, right_t = torch.linalg.svd(self._base_weight_out_in(), full_matrices=False)
            chosen = slice(0, r) if init_weights == "svd_major" else slice(-r, None)
            u.copy_(left[:, chosen])
            vt.copy_(right_t[chosen, :])
        else:
            raise ValueError(f"Unknown StelLA init {init_weights!r}.")
        if s.ndim == 1:
            s.fill_(1.0)
        else:
            s.copy_(torch.eye(r))

    @staticmethod
    def _product(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
        """``U S Vᵀ`` as an (out, in) matrix, for a full or a diagonal ``S``."""
        return times_s(u, s) @ vt

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = s · U S Vᵀ`` (minus ``ΔW₀`` for a function-preserving start), in the base weight's layout."""
        delta = self._product(self.stella_U[adapter], self.stella_S[adapter], self.stella_Vt[adapter])
        if adapter in self.stella_U0:
            delta = delta - self._product(self.stella_U0[adapter], self.stella_S0[adapter], self.stella_Vt0[adapter])
        delta = self.scaling[adapter] * delta
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
        return True

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``s · U S Vᵀ dropout(x)`` (minus the frozen start), through the layer's own map type.

        ``s · S`` is folded into ``Vᵀ`` first (r × r times r × in, no activation involved), so the input passes
        through two maps, ``in → r → out``, as in LoRA, instead of three plus a scaling.
        """
        u, s, vt = self.stella_U[adapter], self.stella_S[adapter], self.stella_Vt[adapter]
        x = self._cast_input_dtype(x, u.dtype)
        scaling = self.scaling[adapter]
        out = self._apply_factors(self.stella_dropout[adapter](x), u, s_times(_scaled(s, scaling), vt))
        if adapter in self.stella_U0:
            start = s_times(_scaled(self.stella_S0[adapter], scaling), self.stella_Vt0[adapter])
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
