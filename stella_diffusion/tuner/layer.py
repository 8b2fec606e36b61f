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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..manifold import random_stiefel
from .config import StellaConfig

# the trained factors and the frozen start of a function-preserving adapter, as named in state dicts and checkpoints
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


def _scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
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
    a, b = vt, _scaled(times_s(u, s), scaling)
    if START_NAMES[0] in state:
        u0, s0, vt0 = (state[name].float() for name in START_NAMES)
        a = torch.cat([a, vt0], dim=0)
        b = torch.cat([b, -_scaled(times_s(u0, s0), scaling)], dim=1)
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
        delta = _scaled(delta, self.scaling[adapter])
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
        out = self._apply_factors(x, u, s_times(_scaled(s, scaling), vt))
        if self._has_start(adapter):
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
