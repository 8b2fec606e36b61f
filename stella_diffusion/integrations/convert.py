"""Convert LoRA files that already exist: a diffusers export or a native StelLA checkpoint into the diffusers,
kohya or BFL layout (`lora_formats`), as a function and as the ``stella-convert`` command.

    stella-convert --to kohya outputs/my-run outputs/my-run/pytorch_lora_weights_kohya.safetensors
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..cli import ArgumentParser
from ..tuner import StellaConfig
from ..tuner.factors import FACTOR_NAMES, START_NAMES, lora_pair, stella_scaling
from .diffusers import (
    ADAPTABLE_COMPONENTS,
    LORA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    _read_native,
    lora_metadata,
)
from .lora_formats import _EXPORT_KEY, FORMATS, WEIGHT_NAMES, _write_formats


def _states_from_native(tensors: Mapping[str, torch.Tensor], configs: Mapping[str, Any]) -> dict[str, tuple]:
    """The export's LoRA pairs computed from a native checkpoint's U, S, Vt and configs (2-D factors)."""
    states = {}
    for component, raw in configs.items():
        config = StellaConfig(**{k: v for k, v in raw.items() if k not in ("peft_type", "peft_version")})
        prefix = f"{component}."
        names = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in tensors if k.startswith(prefix)})
        state: dict[str, torch.Tensor] = {}
        for name in names:
            keys = (f"{prefix}{name}.{k}" for k in FACTOR_NAMES + START_NAMES)
            native = {key.rpartition(".")[2]: tensors[key] for key in keys if key in tensors}
            _, alpha = config.rank_and_alpha(name)
            a, b = lora_pair(native, stella_scaling(alpha, native["stella_U"].shape[-1], config.use_rslora))
            state[f"{name}.lora_A.weight"] = a.contiguous()
            state[f"{name}.lora_B.weight"] = b.contiguous()
        states[component] = (state, lora_metadata(state))
    return states


def _states_from_export(tensors: Mapping[str, torch.Tensor], file: Path) -> dict[str, tuple]:
    """A diffusers export's peft keys split by component (``unet.`` / ``transformer.`` / ``text_encoder*.``)."""
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in ADAPTABLE_COMPONENTS or not _EXPORT_KEY.search(rest):
            raise ValueError(
                f"{file} is not a diffusers LoRA export or a StelLA checkpoint (key `{key}`); convert those only."
            )
        split.setdefault(component, {})[key.partition(".")[2]] = value
    states = {}
    for component, state in split.items():
        metadata = lora_metadata({k: v for k, v in state.items() if "lora_magnitude_vector" not in k})
        if any("lora_magnitude_vector" in k for k in state):
            metadata["use_dora"] = True
        states[component] = (state, metadata)
    return states


def _pipeline_class(base_pipeline: str | Path | None, states: Mapping[str, Any]) -> type:
    """The pipeline class from ``base_pipeline/model_index.json``, else the one the adapted components imply."""
    import diffusers

    if base_pipeline is not None:
        index = Path(base_pipeline) / "model_index.json"
        if not index.is_file():
            raise ValueError(f"--base_pipeline {base_pipeline} is not a diffusers pipeline folder (no {index.name}).")
        name = json.loads(index.read_text()).get("_class_name", "")
        if not isinstance(getattr(diffusers, name, None), type):
            raise ValueError(f"{index} names the pipeline class {name!r}, which this diffusers does not have.")
        return getattr(diffusers, name)
    if "unet" in states:
        return diffusers.StableDiffusionXLPipeline if "text_encoder_2" in states else diffusers.StableDiffusionPipeline
    transformer = states.get("transformer", ({}, {}))[0]
    if any(k.startswith("single_transformer_blocks.") for k in transformer):
        return diffusers.FluxPipeline
    raise ValueError(
        "Cannot tell which pipeline this LoRA belongs to from its keys (SD3, Flux without single-block adapters, "
        "Sana, ...); pass the base pipeline folder (--base_pipeline)."
    )


def _lora_file_header(src: Path) -> tuple[Path, dict[str, str]]:
    if src.is_dir():
        candidates = [src / NATIVE_WEIGHT_NAME, src / LORA_WEIGHT_NAME]
        src = next((c for c in candidates if c.is_file()), candidates[-1])
    if not src.is_file():
        raise FileNotFoundError(f"No LoRA file at {src}.")
    try:
        with safe_open(str(src), framework="pt") as handle:
            return src, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{src} is not a readable safetensors file: {str(err).splitlines()[0]}") from err


def convert_lora_file(
    src: str | Path, dst: str | Path, to: str, *, base_pipeline: str | Path | None = None
) -> Path:
    """Convert a diffusers LoRA export or a native StelLA checkpoint into another format.

    A native checkpoint's LoRA pairs are computed from its U, S, Vt and configs exactly as the live export
    does (``lora_A = Vt``, ``lora_B = s · U S``, a function-preserving start appended); its factors are 2-D, so
    adapters on 1×1 convolutions (no preset targets one) need the export written at training time instead.

    Args:
        src: a ``.safetensors`` file or a folder holding ``stella_adapter.safetensors`` (preferred) or
            ``pytorch_lora_weights.safetensors``.
        dst: the output file, or an existing folder (the file is then named as in `WEIGHT_NAMES`).
        to: ``"diffusers"``, ``"kohya"`` or ``"bfl"``.
        base_pipeline: the base pipeline folder; its ``model_index.json`` names the pipeline class. Needed only
            where the keys do not tell (an SDXL UNet-only LoRA is otherwise taken for SD 1.x; SD3 always).

    Returns:
        the path written.
    """
    file, header = _lora_file_header(Path(src))
    if "stella_configs" in header:
        states = _states_from_native(*_read_native(file))
    else:
        states = _states_from_export(load_file(file), file)
    pipeline_cls = _pipeline_class(base_pipeline, states)
    dst = Path(dst)
    if dst.is_dir():
        dst = dst / WEIGHT_NAMES[to]
    if not dst.parent.is_dir():
        raise ValueError(f"The output folder {dst.parent} does not exist.")
    _write_formats({to: dst}, pipeline_cls, states, None, None)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    """``stella-convert --to {diffusers,kohya,bfl} SRC DST [--base_pipeline DIR]``; errors: one line, exit 1/2.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = ArgumentParser(
        prog="stella-convert",
        description="Convert a StelLA checkpoint or a diffusers LoRA export into a diffusers, kohya "
        "(ComfyUI, A1111 / Forge, kohya tools) or BFL (Flux) LoRA file.",
    )
    parser.add_argument("src", help="stella_adapter.safetensors, pytorch_lora_weights.safetensors or their folder")
    parser.add_argument("dst", help="output file, or an existing folder")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("--base_pipeline", default=None, help="base pipeline folder (names the pipeline class)")
    args = parser.parse_args(argv)
    try:
        path = convert_lora_file(args.src, args.dst, args.to, base_pipeline=args.base_pipeline)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}\n")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
