"""The adapters the training script trains, one class per kind behind one interface.

StelLA is the product; peft's LoRA, DoRA and PiSSA are trained the same way for comparisons. Each kind says how
it is added to a component, how its optimizer is built (StelLA's is made Riemannian), how its resumable state
is saved and loaded (one safetensors file whose header also carries the settings a resume must share), how it
is exported as a LoRA that stock diffusers loads, and how the model card describes it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..integrations.diffusers import (
    NATIVE_WEIGHT_NAME,
    add_stella_adapter,
    default_target_modules,
    inject_adapter,
    load_stella_checkpoint,
    lora_metadata,
    save_stella_checkpoint,
    stella_lora_states,
)
from ..integrations.lora_formats import supported_formats
from .config import TrainingError

PEFT_WEIGHT_NAME = "peft_adapter.safetensors"
SETTINGS_KEY = "training_settings"  # header field of the adapter file: what a resume must share with the run


@dataclass(frozen=True)
class AdapterSettings:
    """Which adapter to train and how (the script's adapter flags)."""

    adapter: str = "stella"
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    denoiser_targets: tuple[str, ...] | None = None
    train_text_encoder: bool = False
    stella_init: str = "orthonormal"
    stella_diag_s: bool = False
    stella_retraction: str = "polar"
    stella_grad_scaling: bool | float = True
    stella_function_preserving: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdapterSettings:
        targets = tuple(t.strip() for t in args.lora_layers.split(",")) if args.lora_layers else None
        return cls(args.adapter, args.rank, args.lora_alpha, args.lora_dropout, targets, args.train_text_encoder,
                   args.stella_init, args.stella_diag_s, args.stella_retraction, args.stella_grad_scaling,
                   args.stella_function_preserving)

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class Adapter:
    """One adapter kind; `make_adapter` picks the class. Subclasses fill in what differs between kinds."""

    description: str

    def __init__(self, settings: AdapterSettings) -> None:
        self.settings = settings

    def resume_settings(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (optimizer-side flags may change)."""
        s = self.settings
        return {"adapter": s.adapter, "rank": s.rank, "lora_alpha": s.scale_alpha, "lora_dropout": s.dropout,
                "lora_layers": list(s.denoiser_targets) if s.denoiser_targets else None,
                "train_text_encoder": s.train_text_encoder}

    def targets(self, component: str, model: nn.Module) -> list[str]:
        denoiser = component in ("unet", "transformer")
        if denoiser and self.settings.denoiser_targets:
            return list(self.settings.denoiser_targets)
        return default_target_modules(model)

    def add_to(self, component: str, model: nn.Module) -> None:
        """Add the adapter to one pipeline component (in float32, before any cast to the training dtype)."""
        raise NotImplementedError

    def save(self, directory: str | Path, components: Mapping[str, nn.Module]) -> Path:
        """Write the resumable adapter state (with the resume settings in the file's header)."""
        raise NotImplementedError

    def load(self, directory: str | Path, components: Mapping[str, nn.Module]) -> None:
        """Restore what `save` wrote into the (already adapted) components."""
        raise NotImplementedError

    export_formats: tuple[str, ...] = ("diffusers", "kohya", "bfl")  # the LoRA layouts this kind can be written in
    adapts_convolutions = True  # whether targets may be convolutions (checked before any weight is loaded)

    def choose_export_formats(self, pipeline_cls: type, requested: Sequence[str] | None) -> list[str]:
        """``--export_format``: the requested layouts if this kind and pipeline can be written so, else one error;
        by default the diffusers file and the kohya file where both can be written."""
        possible = [f for f in supported_formats(pipeline_cls) if f in self.export_formats]
        if requested is None:
            return [f for f in ("diffusers", "kohya") if f in possible]
        impossible = [f for f in requested if f not in possible]
        if impossible:
            raise TrainingError(f"--export_format {', '.join(impossible)}: a {self.settings.adapter} adapter on "
                                f"{pipeline_cls.__name__} can be exported as {', '.join(possible)}.")
        return list(dict.fromkeys(requested))

    def lora_states(self, components: Mapping[str, nn.Module]) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        """The adapter as plain LoRA state dicts with the scale baked in (and their metadata), per component:
        what `lora_formats.save_lora_formats` writes for stock diffusers, ComfyUI, A1111 / Forge and kohya."""
        raise NotImplementedError


class StellaAdapter(Adapter):
    """StelLA: U, S, V with U and V kept orthonormal by the Riemannian optimizer; exported as an exact LoRA."""

    weight_name = NATIVE_WEIGHT_NAME

    def resume_settings(self) -> dict[str, Any]:
        return {**super().resume_settings(), "stella_init": self.settings.stella_init,
                "stella_diag_s": self.settings.stella_diag_s,
                # only when set: checkpoints written before the flag existed stay resumable
                **({"stella_function_preserving": True} if self.settings.stella_function_preserving else {})}

    @property
    def description(self) -> str:
        return (f"StelLA (Stiefel low-rank adaptation), rank {self.settings.rank}. `pytorch_lora_weights.safetensors`"
                " is its exact product as a plain rank-r LoRA (scale baked into `lora_B`, alpha = rank in its "
                f"metadata); `{NATIVE_WEIGHT_NAME}` keeps the factors U, S, V to resume with stella_diffusion.")

    def add_to(self, component: str, model: nn.Module) -> None:
        s = self.settings
        add_stella_adapter(model, r=s.rank, alpha=s.scale_alpha, dropout=s.dropout,
                           target_modules=self.targets(component, model), init_weights=s.stella_init,
                           diag_s=s.stella_diag_s, function_preserving=s.stella_function_preserving)

    def save(self, directory: str | Path, components: Mapping[str, nn.Module]) -> Path:
        return save_stella_checkpoint(directory, components,
                                      metadata={SETTINGS_KEY: json.dumps(self.resume_settings())})

    def load(self, directory: str | Path, components: Mapping[str, nn.Module]) -> None:
        load_stella_checkpoint(directory, components)

    def lora_states(self, components: Mapping[str, nn.Module]) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        return stella_lora_states(components)


class LoraAdapter(Adapter):
    """peft's LoRA (Gaussian init), as diffusers' DreamBooth script adds it; exported with alpha = r."""

    weight_name = PEFT_WEIGHT_NAME
    init_lora_weights: str | bool = "gaussian"
    use_dora = False

    @property
    def description(self) -> str:
        return (f"peft LoRA, rank {self.settings.rank}, as a plain LoRA (scale baked into `lora_B`, alpha = rank in "
                "its metadata).")

    def add_to(self, component: str, model: nn.Module) -> None:
        s = self.settings
        inject_adapter(model, LoraConfig(r=s.rank, lora_alpha=s.scale_alpha, lora_dropout=s.dropout,
                                         init_lora_weights=self.init_lora_weights, use_dora=self.use_dora,
                                         target_modules=self.targets(component, model)))

    def save(self, directory: str | Path, components: Mapping[str, nn.Module]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": value.detach().float().contiguous().cpu()
                   for name, model in components.items()
                   for key, value in get_peft_model_state_dict(model).items()}
        path = directory / PEFT_WEIGHT_NAME
        save_file(tensors, path, metadata={SETTINGS_KEY: json.dumps(self.resume_settings())})
        return path

    def load(self, directory: str | Path, components: Mapping[str, nn.Module]) -> None:
        path = Path(directory) / PEFT_WEIGHT_NAME
        if not path.is_file():
            raise TrainingError(f"{directory} has no {PEFT_WEIGHT_NAME}: not a checkpoint of a "
                                f"{self.settings.adapter} run.")
        tensors = load_file(path)
        for name, model in components.items():
            prefix = f"{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None) or len(state) != len(get_peft_model_state_dict(model)):
                raise TrainingError(f"{path} does not match the `{name}` adapter of this run.")

    def lora_states(self, components: Mapping[str, nn.Module]) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        return peft_lora_states(components)


class DoraAdapter(LoraAdapter):
    """peft's DoRA: a LoRA direction plus a trained magnitude per output (exported with its magnitudes)."""

    use_dora = True
    export_formats = ("diffusers",)  # kohya tools read `dora_scale` differently from peft: see lora_formats

    @property
    def description(self) -> str:
        return (f"peft DoRA, rank {self.settings.rank}: a LoRA (scale baked into `lora_B`) plus a magnitude vector "
                "per adapted layer (`lora_magnitude_vector`), which diffusers loads as DoRA.")


class PissaAdapter(LoraAdapter):
    """peft's PiSSA: starts from the top singular vectors of W, which it moves out of the base weight.

    The export subtracts that start again, so the file is a LoRA on the untouched base (rank 2r).
    """

    init_lora_weights = "pissa"
    adapts_convolutions = False  # peft's PiSSA start is an SVD of a linear weight

    def __init__(self, settings: AdapterSettings) -> None:
        super().__init__(settings)
        self.initial_states: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def description(self) -> str:
        return (f"peft PiSSA, rank {self.settings.rank}, converted back to a LoRA on the untouched base model: the "
                f"file holds rank-{2 * self.settings.rank} factors (the trained adapter minus its SVD start).")

    def add_to(self, component: str, model: nn.Module) -> None:
        super().add_to(component, model)
        start = get_peft_model_state_dict(model)
        self.initial_states[component] = {k: v.detach().clone() for k, v in start.items()}

    def lora_states(self, components: Mapping[str, nn.Module]) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
        return peft_lora_states(components, self.initial_states)


ADAPTERS: dict[str, type[Adapter]] = {
    "stella": StellaAdapter, "lora": LoraAdapter, "dora": DoraAdapter, "pissa": PissaAdapter,
}


def make_adapter(settings: AdapterSettings | None = None, **fields: Any) -> Adapter:
    """The adapter of ``settings.adapter`` (or of `AdapterSettings(**fields)`)."""
    settings = settings or AdapterSettings(**fields)
    return ADAPTERS[settings.adapter](settings)


def read_saved_settings(directory: str | Path) -> dict[str, Any] | None:
    """The resume settings in the header of a checkpoint's adapter file (``None`` when there is no such file)."""
    for name in (NATIVE_WEIGHT_NAME, PEFT_WEIGHT_NAME):
        path = Path(directory) / name
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    header = handle.metadata() or {}
                return json.loads(header[SETTINGS_KEY])
            except (SafetensorError, OSError, KeyError, ValueError) as err:
                raise TrainingError(f"{path} is not a readable adapter checkpoint: {err}") from err
    return None


@torch.no_grad()
def plain_lora_state_dict(model: nn.Module, initial_state: Mapping[str, torch.Tensor] | None = None) -> dict:
    """A peft LoRA / DoRA adapter as an alpha = r LoRA (scale baked into ``lora_B``); PiSSA converted to LoRA.

    Baking the scale makes the file mean the same to every consumer (some ignore alpha). With
    ``initial_state`` (PiSSA's start ``B₀ A₀``, which was subtracted from the base weight), the adapter becomes
    ``ΔW = s (B A − B₀ A₀) = [sB, −sB₀] [A; A₀]`` on the untouched base — peft's own conversion, in one step.
    """
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        scale = layer.scaling["default"]
        if initial_state is not None:
            state[key_a] = torch.cat([state[key_a], initial_state[key_a].float()], dim=0)
            state[key_b] = torch.cat([state[key_b], -initial_state[key_b].float()], dim=1)
        state[key_b] = scale * state[key_b]
    # DoRA's magnitude as `….lora_magnitude_vector.weight`: diffusers' UNet / transformer loader reads either
    # spelling, but text encoders load through transformers, which drops the key without `.weight`
    return {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v.contiguous() for k, v in state.items()}


def peft_lora_states(
    components: Mapping[str, nn.Module],
    initial_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The baselines' LoRA states with alpha = r metadata like StelLA's (`plain_lora_state_dict` per component).

    Args:
        components: pipeline component name → model with a peft LoRA / DoRA / PiSSA adapter.
        initial_states: PiSSA's start per component, subtracted so the file applies to the untouched base.
    """
    states = {}
    for name, model in components.items():
        state = plain_lora_state_dict(model, (initial_states or {}).get(name))
        metadata = lora_metadata(state)
        if any("lora_magnitude_vector" in k for k in state):
            metadata["use_dora"] = True
        states[name] = (state, metadata)
    return states
