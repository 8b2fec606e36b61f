"""StelLA on diffusers pipelines: target presets, the LoRA export that stock diffusers loads, native checkpoints.

The export (docs/algorithm.md §4) is a plain rank-r LoRA: ``lora_A = Vt`` and ``lora_B = s · U S`` (alpha = r,
scale 1), so ``pipe.load_lora_weights(dir)``, ``fuse_lora``, ``set_adapters`` and ``unload_lora_weights`` work on it
without this package. The native checkpoint keeps U, S, V and the config, so training can resume.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..tuner import StellaConfig, StellaLayer
from ..tuner.factors import check_native_state, layer_dims, native_state_shapes

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
NATIVE_WEIGHT_NAME = "stella_adapter.safetensors"
_NATIVE_FORMAT = "stella-diffusion/1"

# Components of a pipeline that can carry adapters, in the order diffusers' savers name them.
ADAPTABLE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT_ATTENTION = _ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

# Attention projections per model class (docs/algorithm.md §5: q/k/v/out of every self- and cross-attention).
TARGET_PRESETS: dict[str, list[str]] = {
    "UNet2DConditionModel": _ATTENTION,  # SD 1.x / 2.x / SDXL
    "SD3Transformer2DModel": _JOINT_ATTENTION,
    "FluxTransformer2DModel": _JOINT_ATTENTION,
    "PixArtTransformer2DModel": _ATTENTION,
    "SanaTransformer2DModel": _ATTENTION,
    "CLIPTextModel": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "CLIPTextModelWithProjection": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "T5EncoderModel": ["q", "k", "v", "o"],
}


def default_target_modules(model: nn.Module) -> list[str]:
    """The preset for ``model``'s class; only projections that exist in this model are kept."""
    name = type(model).__name__
    if name not in TARGET_PRESETS:
        raise ValueError(f"No StelLA target preset for {name}; pass `target_modules` explicitly.")
    present = {n for n, _ in model.named_modules()}
    return [t for t in TARGET_PRESETS[name] if any(n == t or n.endswith("." + t) for n in present)]


def inject_adapter(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
    """Add a fresh peft adapter (StelLA, LoRA, DoRA, PiSSA, ...) to a diffusers or transformers model.

    Goes through peft's public ``inject_adapter_in_model`` rather than the model's ``add_adapter``: transformers'
    ``add_adapter`` refuses every peft older than the one its release pins, whereas the injection itself is
    peft's and works with any peft we support. The config is recorded in ``model.peft_config``, where peft's
    state-dict helpers, the models' own adapter methods and the Riemannian optimizer look for it.

    Args:
        model: a diffusers `ModelMixin` or a transformers `PreTrainedModel` (any `nn.Module` works).
        config: the adapter's peft config.
        adapter_name: the name of the new adapter; an existing name is an error.
    """
    configs = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
    inject_adapter_in_model(config, model, adapter_name)
    model.peft_config = {**configs, adapter_name: config}
    if hasattr(model, "_hf_peft_config_loaded"):  # diffusers' / transformers' mixins: "an adapter is loaded"
        model._hf_peft_config_loaded = True


def add_stella_adapter(
    model: nn.Module, config: StellaConfig | None = None, adapter_name: str = "default", **config_kwargs: Any
) -> StellaConfig:
    """Add a StelLA adapter to a diffusers or transformers model (see `inject_adapter`).

    Without ``target_modules`` the class preset is used. Returns the config actually used.
    """
    if config is None:
        config = StellaConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError("Pass either a StellaConfig or keyword arguments, not both.")
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    inject_adapter(model, config, adapter_name)
    return config


def _stella_modules(model: nn.Module, adapter_name: str) -> dict[str, StellaLayer]:
    """The StelLA layers of ``model`` that hold the adapter ``adapter_name``, by module path."""
    layers = ((name, m) for name, m in model.named_modules() if isinstance(m, StellaLayer))
    return {name: m for name, m in layers if adapter_name in m.stella_adapters}


def stella_lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The exact LoRA factors of every StelLA layer of ``model`` (peft key names, no component prefix).

    ``lora_A = Vt`` and ``lora_B = s · U S``; with a function-preserving start the export is the exact
    ``ΔW − ΔW₀`` of rank ≤ 2r (`StellaLayer.lora_factors`).

    Args:
        model: a model with StelLA adapters.
        adapter_name: the adapter to export.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in _stella_modules(model, adapter_name).items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = layer.lora_factors(adapter_name)
    return state


def lora_metadata(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`LoraConfig` kwargs that make the scale exactly 1 (alpha = rank for every module).

    Written even though the scale is already baked into ``lora_B``, because consumers that ignore it assume
    alpha = r, and diffusers builds its `LoraConfig` from it.
    """
    ranks = {k.removesuffix(".lora_B.weight"): v.shape[1] for k, v in state.items() if k.endswith(".lora_B.weight")}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    others = {name: r for name, r in ranks.items() if r != common}
    return {
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "rank_pattern": others,
        "alpha_pattern": dict(others),
    }


def save_lora_state_dicts(
    output_dir: str | Path,
    pipeline_cls: type,
    states: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` through ``pipeline_cls.save_lora_weights``.

    ``states`` maps pipeline component names (``unet``, ``transformer``, ``text_encoder``, ...) to a peft
    LoRA state dict and its adapter metadata (``lora_metadata``); components the saver has no argument for
    are an error, so nothing is silently left out of the file.
    """
    saver = getattr(pipeline_cls, "save_lora_weights", None)
    if saver is None:
        raise ValueError(
            f"{pipeline_cls.__name__} has no LoRA loader in diffusers, so no export of it can be loaded with "
            "`load_lora_weights` (PixArt is such a pipeline: use Sana, SD3 or Flux). Save the native StelLA "
            "checkpoint with `save_stella_checkpoint` instead."
        )
    accepted = inspect.signature(saver).parameters
    kwargs: dict[str, Any] = {}
    for component, (state, metadata) in states.items():
        if f"{component}_lora_layers" not in accepted:
            raise ValueError(f"{pipeline_cls.__name__}.save_lora_weights cannot save adapters of `{component}`.")
        kwargs[f"{component}_lora_layers"] = state
        if f"{component}_lora_adapter_metadata" in accepted:
            kwargs[f"{component}_lora_adapter_metadata"] = metadata
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    saver(output_dir, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    return output_dir / LORA_WEIGHT_NAME


def stella_lora_states(
    components: Mapping[str, nn.Module], adapter_name: str = "default"
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Component name → (exact LoRA state dict, its `lora_metadata`) for every component with the adapter.

    The input of `lora_formats.save_lora_formats` / `save_lora_state_dicts`; a missing adapter is an error.
    """
    states = {}
    for component, model in components.items():
        state = stella_lora_state_dict(model, adapter_name)
        if state:
            states[component] = (state, lora_metadata(state))
    if not states:
        raise ValueError(f"No StelLA adapter named {adapter_name!r} found in the given components.")
    return states


def _config_for_file(config: StellaConfig) -> dict[str, Any]:
    data = config.to_dict()
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), set):
            data[key] = sorted(data[key])
    data["peft_type"] = str(data["peft_type"].value if hasattr(data["peft_type"], "value") else data["peft_type"])
    return data


def save_stella_checkpoint(
    output_dir: str | Path,
    components: Mapping[str, nn.Module],
    adapter_name: str = "default",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save U, S, V (and the frozen start, if any) of every component plus their configs in one safetensors file.

    Keys are ``{component}.{module path}.stella_{U,S,Vt,U0,S0,Vt0}``; the configs travel in the header, so a
    checkpoint is one file that either loads whole or fails with a clear error.

    Args:
        output_dir: the folder of ``stella_adapter.safetensors``.
        components: pipeline component name → model carrying the StelLA adapter.
        adapter_name: which adapter to save.
        metadata: extra header fields (strings), e.g. the training settings a resume must share.
    """
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    for component, model in components.items():
        modules = _stella_modules(model, adapter_name)
        if not modules:
            continue
        configs[component] = _config_for_file(model.peft_config[adapter_name])
        for name, layer in modules.items():
            for key, tensor in layer.native_state(adapter_name).items():
                tensors[f"{component}.{name}.{key}"] = tensor.float().contiguous().cpu()
    if not tensors:
        raise ValueError(f"No StelLA adapter named {adapter_name!r} found in the given components.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / NATIVE_WEIGHT_NAME
    header = {**(metadata or {}), "format": _NATIVE_FORMAT, "stella_configs": json.dumps(configs)}
    save_file(tensors, path, metadata=header)
    return path


def _read_native(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    file = path / NATIVE_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No StelLA checkpoint at {path}: expected the file {file}.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable StelLA checkpoint (corrupt or truncated file): {err}") from err
    if header.get("format") != _NATIVE_FORMAT or "stella_configs" not in header:
        raise ValueError(
            f"{file} is not a StelLA checkpoint (no '{_NATIVE_FORMAT}' header); a LoRA export is loaded with "
            "`pipe.load_lora_weights` instead."
        )
    return tensors, json.loads(header["stella_configs"])


def load_stella_checkpoint(
    path: str | Path, components: Mapping[str, nn.Module], adapter_name: str = "default"
) -> dict[str, StellaConfig]:
    """Load a native checkpoint into ``components`` as trainable StelLA adapters (adding them if absent).

    Every component is checked before any is touched: the header's configs, the target modules and each tensor's
    shape against the existing adapter or, where there is none yet, against the dimensions of the base layers the
    config would adapt. A missing or corrupt file, a component the checkpoint does not match, another target set
    or another rank is one clear error, and the models are left exactly as they were.

    Args:
        path: the checkpoint file or the folder holding ``stella_adapter.safetensors``.
        components: pipeline component names (``unet``, ``text_encoder``, ...) to models.
        adapter_name: the adapter to load into (created where absent).
    """
    tensors, configs = _read_native(Path(path))
    missing = sorted(set(configs) - set(components))
    if missing:
        raise ValueError(f"The checkpoint has adapters for {missing}, which were not given.")
    plans: list[tuple[str, StellaConfig, dict[str, dict[str, torch.Tensor]], bool]] = []
    for component, raw in configs.items():
        model = components[component]
        config = _config_from_file(component, raw)
        saved = _module_states(component, tensors)
        layers = _stella_modules(model, adapter_name)
        if layers:
            expected = {name: layer.native_shapes(adapter_name) for name, layer in layers.items()}
        else:
            expected = _planned_shapes(component, model, config, adapter_name)
        _check_states(component, saved, expected)
        plans.append((component, config, saved, not layers))
    # every check has passed: only now is anything written
    for component, config, saved, add in plans:
        model = components[component]
        if add:
            inject_adapter(model, config, adapter_name)
        for name, layer in _stella_modules(model, adapter_name).items():
            layer.load_native_state(adapter_name, saved[name], where=f"{component}.{name}")
    return {component: config for component, config, _, _ in plans}


def _config_from_file(component: str, raw: Mapping[str, Any]) -> StellaConfig:
    try:
        return StellaConfig(**{k: v for k, v in raw.items() if k not in ("peft_type", "peft_version")})
    except (TypeError, ValueError) as err:
        raise ValueError(f"The checkpoint's config of `{component}` is not a valid StellaConfig: {err}") from err


def _module_states(component: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors of ``component`` as ``{module path: native state}``."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    prefix = f"{component}."
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            module, _, attr = key[len(prefix) :].rpartition(".")
            states.setdefault(module, {})[attr] = tensor
    return states


def _planned_shapes(
    component: str, model: nn.Module, config: StellaConfig, adapter_name: str
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The native shapes of the adapter `inject_adapter` would create, read off the base layers.

    The modules are matched by peft's own ``check_target_module_exists``, as the injection matches them; nothing
    is injected.
    """
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"`{component}` already has a non-StelLA adapter named {adapter_name!r}.")
    inside_adapters = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    shapes = {}
    for name, module in model.named_modules():
        if not name or name.startswith(inside_adapters) or not check_target_module_exists(config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_features, out_features = layer_dims(base, f"{component}.{name}")
        r, _ = config.rank_and_alpha(name)
        shapes[name] = native_state_shapes(
            in_features, out_features, r, diag_s=config.diag_s, function_preserving=config.function_preserving
        )
    return shapes


def _check_states(
    component: str,
    saved: Mapping[str, Mapping[str, torch.Tensor]],
    expected: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> None:
    if saved.keys() != expected.keys():
        only_saved, only_model = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
        raise ValueError(
            f"The checkpoint's `{component}` adapter targets other modules than the model's: only in the checkpoint "
            f"{only_saved[:5]}, only in the model {only_model[:5]}."
        )
    for name in sorted(expected):
        check_native_state(saved[name], expected[name], f"{component}.{name}")


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The adaptable components a pipeline has (``unet`` / ``transformer`` and its text encoders)."""
    return {name: getattr(pipe, name) for name in ADAPTABLE_COMPONENTS if getattr(pipe, name, None) is not None}


def load_stella_into_pipeline(pipe: Any, path: str | Path, adapter_name: str = "default") -> dict[str, StellaConfig]:
    """Put a native StelLA checkpoint into a loaded pipeline as live StelLA layers (e.g. for generation)."""
    return load_stella_checkpoint(path, pipeline_components(pipe), adapter_name)
