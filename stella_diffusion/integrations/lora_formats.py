"""LoRA files that ComfyUI, A1111 / Forge and kohya-based tools load, written next to the diffusers file.

Every file holds the same exact ΔW as the diffusers export (the scale is baked into the up / B matrix, so
alpha = rank everywhere); only the key layout differs:

- ``diffusers`` (``pytorch_lora_weights.safetensors``): peft keys ``unet.`` / ``transformer.`` /
  ``text_encoder*.<module>.lora_{A,B}.weight`` through the pipeline's own ``save_lora_weights``. For
  ``load_lora_weights``; ComfyUI also reads it for SD3 and Flux (not for SD 1.x / SDXL UNets).
- ``kohya`` (``pytorch_lora_weights_kohya.safetensors``): ``<name>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` with kohya sd-scripts' names: SD 1.x ``lora_unet_<UNet path>``, ``lora_te_<CLIP path>``; SDXL
  ``lora_unet_``, ``lora_te1_``, ``lora_te2_``; Flux ``lora_unet_<BFL path>`` (q/k/v fused), ``lora_te1_``.
  ``ss_*`` metadata as sd-scripts writes it. For ComfyUI, A1111 / Forge, kohya tools and diffusers.
- ``bfl`` (Flux only, ``pytorch_lora_weights_bfl.safetensors``): ComfyUI's native names
  ``diffusion_model.<BFL path>`` and ``text_encoders.clip_l.transformer.<CLIP path>`` with the same per-module
  tensors; ComfyUI and diffusers read it.

CLIP text encoders are always named as in transformers 4 (``text_model.encoder.layers.N...``), whatever
transformers is installed: transformers 5 dropped that level from ``CLIPTextModel``, and every consumer above
expects it. SD3 gets only the diffusers file: diffusers and ComfyUI load it (``transformer.`` keys, canonical
CLIP names), and diffusers has no loader for kohya's SD3 layout to check another one against.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_path
from .diffusers import (
    LORA_WEIGHT_NAME,
    save_lora_state_dicts,
    stella_lora_states,
)

FORMATS = ("diffusers", "kohya", "bfl")
WEIGHT_NAMES = {
    "diffusers": LORA_WEIGHT_NAME,
    "kohya": "pytorch_lora_weights_kohya.safetensors",
    "bfl": "pytorch_lora_weights_bfl.safetensors",
}
# kohya sd-scripts' `ss_base_model_version` per family; SD 2.x callers pass "sd_v2".
DEFAULT_BASE_MODEL_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}

States = Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]

# Module paths of a CLIP text encoder that transformers 4 keeps under `text_model.` (not `text_projection`).
_CLIP_UNDER_TEXT_MODEL = re.compile(r"(embeddings|encoder\.layers|final_layer_norm)\.")
# kohya prefix per family and component (sd-scripts: `lora_te_` for SD 1.x's only encoder, te1 / te2 else)
_KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_unet", "text_encoder": "lora_te1"},
}
_BFL_PREFIXES = {"transformer": "diffusion_model", "text_encoder": "text_encoders.clip_l.transformer"}

# Flux: BFL module ← diffusers modules in the BFL module's row order, each with its output width in units of
# the attention width (single blocks' linear1 is q, k, v and the MLP input, mlp_ratio 4, fused).
_FLUX_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
    "img_attn.proj": (("attn.to_out.0", 1),),
    "txt_attn.proj": (("attn.to_add_out", 1),),
    "img_mlp.0": (("ff.net.0.proj", 1),),
    "img_mlp.2": (("ff.net.2", 1),),
    "txt_mlp.0": (("ff_context.net.0.proj", 1),),
    "txt_mlp.2": (("ff_context.net.2", 1),),
    "img_mod.lin": (("norm1.linear", 1),),
    "txt_mod.lin": (("norm1_context.linear", 1),),
}
_FLUX_SINGLE = {
    "linear1": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4)),
    "linear2": (("proj_out", 1),),
    "modulation.lin": (("norm.linear", 1),),
}
_FLUX_GLOBAL = {
    "img_in": (("x_embedder", 1),),
    "txt_in": (("context_embedder", 1),),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1", 1),),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2", 1),),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1", 1),),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2", 1),),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1", 1),),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2", 1),),
    "final_layer.linear": (("proj_out", 1),),
}
# (diffusers scope, module path inside it) → (BFL scope, BFL module, index of the part, all parts)
_FLUX_PARTS = {
    (scope, part): (bfl_scope, bfl, index, parts)
    for scope, bfl_scope, table in (
        ("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
        ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE),
        ("", "", _FLUX_GLOBAL),
    )
    for bfl, parts in table.items()
    for index, (part, _) in enumerate(parts)
}

# the keys of a diffusers / peft export after the component prefix
_EXPORT_KEY = re.compile(r"\.lora_[AB]\.weight$|\.lora_magnitude_vector(\.weight)?$")

_DORA_REFUSED = (
    "DoRA adapters (lora_magnitude_vector) cannot be written as a kohya / BFL file: DoRA renormalises W + ΔW per "
    "output row with the base weights, while kohya-style `dora_scale` is renormalised per input column by A1111 "
    "/ Forge and dropped by diffusers' Flux loader, so no such file means the same to every tool. Use the "
    "diffusers file (pytorch_lora_weights.safetensors), which carries DoRA exactly."
)


def canonical_clip_name(name: str) -> str:
    """A CLIP text-encoder module or parameter path in transformers 4's layout (with the ``text_model.`` level).

    Args:
        name: a path from ``named_modules()`` / a peft state dict of ``CLIPTextModel`` or
            ``CLIPTextModelWithProjection`` under any transformers version, e.g. ``encoder.layers.0.self_attn.q_proj``.

    Returns:
        e.g. ``text_model.encoder.layers.0.self_attn.q_proj``; paths already canonical, ``text_projection`` and
        non-CLIP paths (T5's ``encoder.block...``) are returned unchanged.
    """
    return f"text_model.{name}" if _CLIP_UNDER_TEXT_MODEL.match(name) else name


def _metadata_name(name: str) -> str:
    # peft matches target names as suffixes, so the name without `text_model.` finds the module in both layouts
    return name.removeprefix("text_model.")


def canonical_text_encoder_state(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A text encoder's peft LoRA state dict with canonical CLIP keys, and its adapter metadata made portable.

    The keys get ``text_model.`` (diffusers strips it again for a transformers 5 ``CLIPTextModel``); module
    names in ``target_modules`` / ``rank_pattern`` / ``alpha_pattern`` lose it, because peft matches them as
    suffixes and diffusers does not rewrite the metadata: the short name matches under transformers 4 and 5.

    Args:
        state: peft keys without the component prefix, e.g. ``encoder.layers.0.self_attn.q_proj.lora_A.weight``.
        metadata: the `LoraConfig` kwargs written with it (`pipelines.lora_metadata`).
    """
    portable = dict(metadata)
    if isinstance(portable.get("target_modules"), (list, tuple, set)):
        portable["target_modules"] = sorted(_metadata_name(n) for n in portable["target_modules"])
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(portable.get(key), Mapping):
            portable[key] = {_metadata_name(n): v for n, v in portable[key].items()}
    return {canonical_clip_name(k): v for k, v in state.items()}, portable


def pipeline_family(pipeline_cls: type) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or ``"other"``, from the pipeline's diffusers LoRA loader mixin."""
    from diffusers.loaders import (
        FluxLoraLoaderMixin,
        SD3LoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )

    for mixin, family in (
        (StableDiffusionXLLoraLoaderMixin, "sdxl"),
        (StableDiffusionLoraLoaderMixin, "sd"),
        (SD3LoraLoaderMixin, "sd3"),
        (FluxLoraLoaderMixin, "flux"),
    ):
        if issubclass(pipeline_cls, mixin):
            return family
    return "other"


def supported_formats(pipeline_cls: type) -> tuple[str, ...]:
    """The formats `save_lora_formats` writes for ``pipeline_cls`` (e.g. to default ``--export_format``)."""
    family = pipeline_family(pipeline_cls)
    if family == "flux":
        return FORMATS
    return ("diffusers", "kohya") if family in _KOHYA_PREFIXES else ("diffusers",)


def _lora_pairs(component: str, state: Mapping[str, torch.Tensor]) -> Pairs:
    """``{module path: (down = lora_A, up = lora_B)}`` of a peft LoRA state dict; DoRA and other keys refused."""
    pairs: Pairs = {}
    for key in state:
        if "lora_magnitude_vector" in key:
            raise ValueError(_DORA_REFUSED)
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            if f"{name}.lora_B.weight" not in state:
                raise ValueError(f"`{component}.{key}` has no matching lora_B.weight.")
            pairs[name] = (state[key], state[f"{name}.lora_B.weight"])
        elif not key.endswith(".lora_B.weight"):
            raise ValueError(f"`{component}.{key}` is not a peft LoRA key (…lora_A.weight / …lora_B.weight).")
    return pairs


def _flux_part(name: str) -> tuple[str, int, tuple[tuple[str, int], ...]]:
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
    scope, block, part = (match[1], match[2], match[3]) if match else ("", "", name)
    if (scope, part) not in _FLUX_PARTS:
        raise ValueError(f"The Flux module `transformer.{name}` has no BFL counterpart this exporter knows.")
    bfl_scope, bfl, index, parts = _FLUX_PARTS[(scope, part)]
    return (f"{bfl_scope}.{block}.{bfl}" if bfl_scope else bfl), index, parts


def flux_bfl_pairs(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Pairs:
    """Flux transformer LoRA pairs renamed to BFL modules, with fused projections fused exactly.

    A fused module (``img_attn.qkv``, ``txt_attn.qkv``, ``single_blocks.N.linear1`` = q, k, v, MLP in) gets
    down = the parts' down matrices stacked (rank = sum of their ranks) and up = block diagonal, zero where a
    part has no adapter, so ``up @ down`` is exactly the parts' ΔW stacked in BFL row order.

    Args:
        pairs: ``{diffusers module path: (lora_A, lora_B)}`` of a ``FluxTransformer2DModel`` (scale baked in).
    """
    groups: dict[str, tuple[tuple[tuple[str, int], ...], dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for name, pair in pairs.items():
        bfl, index, parts = _flux_part(name)
        groups.setdefault(bfl, (parts, {}))[1][index] = pair
    fused: Pairs = {}
    for bfl, (parts, present) in sorted(groups.items()):
        if len(parts) == 1:
            fused[bfl] = present[0]
            continue
        # the attention width, from any part that has an adapter (every part's rows are a multiple of it)
        widths = {present[i][1].shape[0] / parts[i][1] for i in present}
        if len(widths) != 1 or not float(next(iter(widths))).is_integer():
            raise ValueError(f"The parts of Flux's `{bfl}` have inconsistent output sizes; cannot fuse them.")
        width = int(widths.pop())
        down = torch.cat([present[i][0] for i in sorted(present)], dim=0)
        up = down.new_zeros(sum(mult for _, mult in parts) * width, down.shape[0])
        row = col = 0
        for i, (_, mult) in enumerate(parts):
            if i in present:
                part_down, part_up = present[i]
                up[row : row + mult * width, col : col + part_down.shape[0]] = part_up
                col += part_down.shape[0]
            row += mult * width
        fused[bfl] = (down.contiguous(), up)
    return fused


def _named_pairs(fmt: str, family: str, states: States) -> Pairs:
    """Every module's (down, up) under its kohya / BFL key name (without the .lora_down / .alpha suffix)."""
    prefixes = _BFL_PREFIXES if fmt == "bfl" else _KOHYA_PREFIXES[family]
    named: Pairs = {}
    for component, (state, _) in states.items():
        if component not in prefixes:
            raise ValueError(f"A {fmt} file for {family!r} pipelines has no place for adapters of `{component}`.")
        pairs = _lora_pairs(component, state)
        if component == "transformer":  # Flux
            pairs = flux_bfl_pairs(pairs)
        elif component.startswith("text_encoder"):
            pairs = {canonical_clip_name(n): p for n, p in pairs.items()}
        for name, pair in pairs.items():
            separator, path = (".", name) if fmt == "bfl" else ("_", name.replace(".", "_"))
            named[f"{prefixes[component]}{separator}{path}"] = pair
    return named


def kohya_metadata(
    ranks: Sequence[int], base_model_version: str, training_metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``ss_*`` header sd-scripts writes (network module, dim, alpha, base model) plus the caller's settings.

    Args:
        ranks: every module's rank; the most common one is ``ss_network_dim`` (= ``ss_network_alpha``: scale 1).
        base_model_version: e.g. ``"sd_v1"``, ``"sd_v2"``, ``"sdxl_base_v1-0"``, ``"flux1"``.
        training_metadata: extra string entries (e.g. ``ss_learning_rate``); they may not replace the above.
    """
    dim = Counter(ranks).most_common(1)[0][0]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_base_model_version": base_model_version,
    }
    for key, value in (training_metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"Training metadata must map strings to strings; got {key!r}: {value!r}.")
        if key in metadata:
            raise ValueError(f"Training metadata may not set `{key}`; it is computed from the adapter.")
        metadata[key] = value
    return metadata


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Readers never see half a file (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _kohya_payload(
    fmt: str, family: str, states: States, base_model_version: str | None, training_metadata: Mapping[str, str] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya / BFL file: per module lora_down, lora_up and a float32 alpha = rank."""
    named = _named_pairs(fmt, family, states)
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in named.items():
        tensors[f"{name}.lora_down.weight"] = down.float().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.float().contiguous()
        # the scale is already in `up`: alpha = rank makes alpha / rank = 1 in every loader
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    version = base_model_version or DEFAULT_BASE_MODEL_VERSIONS[family]
    ranks = [down.shape[0] for down, _ in named.values()]
    return tensors, kohya_metadata(ranks, version, training_metadata)


def _write_diffusers(path: Path, pipeline_cls: type, states: States) -> None:
    """The pipeline's own ``save_lora_weights`` into a temporary folder next to ``path``, then renamed."""
    canonical = {
        component: canonical_text_encoder_state(state, metadata) if component.startswith("text_encoder")
        else (state, metadata)
        for component, (state, metadata) in states.items()
    }
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-export-") as tmp:
        os.replace(save_lora_state_dicts(tmp, pipeline_cls, canonical), path)


def _write_formats(
    paths: Mapping[str, Path],
    pipeline_cls: type,
    states: States,
    base_model_version: str | None,
    training_metadata: Mapping[str, str] | None,
) -> None:
    """Check every format, build every kohya / BFL payload, and only then write the files (format → path)."""
    check_formats(list(paths), pipeline_cls)
    family = pipeline_family(pipeline_cls)
    payloads = {
        fmt: _kohya_payload(fmt, family, states, base_model_version, training_metadata)
        for fmt in paths
        if fmt != "diffusers"
    }
    for fmt, path in paths.items():
        if fmt == "diffusers":
            _write_diffusers(path, pipeline_cls, states)
        else:
            _write_atomically(path, *payloads[fmt])


def check_formats(formats: Sequence[str], pipeline_cls: type) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"Unknown LoRA format(s) {unknown}; choose from {list(FORMATS)}.")
    unsupported = [f for f in formats if f not in supported_formats(pipeline_cls)]
    if unsupported:
        raise ValueError(
            f"{pipeline_cls.__name__} has no {'/'.join(unsupported)} LoRA format here; it supports "
            f"{list(supported_formats(pipeline_cls))} (kohya: SD 1.x / 2.x, SDXL and Flux; bfl: Flux)."
        )


def save_lora_formats(
    output_dir: str | Path,
    pipeline_cls: type,
    states: States,
    formats: Sequence[str],
    *,
    base_model_version: str | None = None,
    training_metadata: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the LoRA export in each of ``formats`` into ``output_dir`` (file names: `WEIGHT_NAMES`).

    Every file is written to a temporary name in ``output_dir`` and renamed, and all formats are checked before
    the first file is written.

    Args:
        output_dir: folder for the files (created if needed).
        pipeline_cls: the diffusers pipeline class the adapters belong to (selects prefixes and layouts).
        states: component name → (peft LoRA state dict with the scale baked in, its `lora_metadata`), as
            taken by `pipelines.save_lora_state_dicts`.
        formats: any of ``"diffusers"``, ``"kohya"``, ``"bfl"`` (see `supported_formats`).
        base_model_version: kohya's ``ss_base_model_version``; default per family (`DEFAULT_BASE_MODEL_VERSIONS`).
        training_metadata: extra string entries for the kohya / BFL header (e.g. ``ss_learning_rate``).

    Returns:
        format → path of the file written.
    """
    check_formats(formats, pipeline_cls)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: output_dir / WEIGHT_NAMES[fmt] for fmt in formats}
    _write_formats(paths, pipeline_cls, states, base_model_version, training_metadata)
    return paths


def save_lora_export(
    output_dir: str | Path,
    pipeline_cls: type,
    components: Mapping[str, nn.Module],
    adapter_name: str = "default",
    formats: Sequence[str] = ("diffusers",),
) -> Path:
    """Write the StelLA adapters of ``components`` as LoRA files that stock tools load.

    Args:
        output_dir: folder for the files.
        pipeline_cls: the pipeline class whose loader the files are for (names the components).
        components: pipeline component name (``unet``, ``transformer``, ``text_encoder``, ...) → model carrying
            the StelLA adapter.
        adapter_name: which adapter to export.
        formats: the layouts to write (see `save_lora_formats`); default the diffusers file alone.

    Returns:
        the path of the first format's file (``pytorch_lora_weights.safetensors`` by default).
    """
    paths = save_lora_formats(output_dir, pipeline_cls, stella_lora_states(components, adapter_name), formats)
    return paths[formats[0]]
