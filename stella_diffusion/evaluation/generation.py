"""Generate images for FID: a saved pipeline, an optional adapter, a prompt file → PNGs + ``metadata.jsonl``.

Image ``i`` (prompt-major order) is drawn with its own CPU generator seeded ``seed + i``: an image does not
depend on the batch size or on the other images of its batch, and its initial noise is the same on any device.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from ..files import METADATA_FILE, list_images
from ..integrations.diffusers import LORA_WEIGHT_NAME, NATIVE_WEIGHT_NAME, load_stella_into_pipeline


def load_adapter(pipe: DiffusionPipeline, adapter_dir: str | Path) -> str:
    """Load a LoRA export (``pytorch_lora_weights.safetensors``) or a native StelLA checkpoint into ``pipe``.

    When a folder holds both (as ``save_lora_export`` and ``save_stella_checkpoint`` write them), the LoRA
    export is used: it is what stock diffusers users load, and it gives the same model. Returns the format
    loaded, ``"lora"`` or ``"stella"``.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / LORA_WEIGHT_NAME).is_file():
        if not hasattr(pipe, "load_lora_weights"):
            raise TypeError(
                f"{type(pipe).__name__} has no LoRA loader in diffusers; use a native StelLA checkpoint."
            )
        pipe.load_lora_weights(adapter_dir, weight_name=LORA_WEIGHT_NAME)  # named: older diffusers need it offline
        return "lora"
    if (adapter_dir / NATIVE_WEIGHT_NAME).is_file():
        load_stella_into_pipeline(pipe, adapter_dir)
        return "stella"
    raise FileNotFoundError(f"{adapter_dir} holds neither {LORA_WEIGHT_NAME} nor {NATIVE_WEIGHT_NAME}.")


def load_pipeline(
    pipeline_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """A saved diffusers pipeline (UNet or DiT) from a folder, with an optional adapter, on ``device``.

    ``dtype=None`` keeps the saved dtypes. Otherwise ``torch_dtype`` is passed: recent diffusers deprecate it
    for ``dtype``, which older ones lack.
    """
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, **kwargs)
    if adapter_dir is not None:
        load_adapter(pipe, adapter_dir)
    return pipe.to(device)


def generate_images(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    generation_kwargs: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write ``len(prompts) × num_images_per_prompt`` PNGs and one ``metadata.jsonl`` line per image.

    ``generation_kwargs`` go to the pipeline call (steps, guidance, size, ...); they and ``settings``
    (e.g. the pipeline and adapter paths) are recorded in each line with the prompt and the seed.
    An output folder that already holds images is refused unless ``overwrite``, which deletes them first: stale
    images would enter FID.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = list_images(out_dir)
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds images; pass overwrite=True (--overwrite) to replace."
        )
    for path in stale:  # replaced, not mixed in: leftovers of a larger earlier run would enter FID
        path.unlink()
    kwargs = dict(generation_kwargs or {})
    kwargs.pop("output_type", None)  # always PIL images, written as PNG
    recorded = {**(settings or {}), "pipeline_class": type(pipe).__name__, **kwargs}
    jobs = [(p, prompt) for p, prompt in enumerate(prompts) for _ in range(num_images_per_prompt)]
    pipe.set_progress_bar_config(disable=True)
    records: list[dict[str, Any]] = []
    with (
        (out_dir / METADATA_FILE).open("w", encoding="utf-8") as metadata,
        tqdm(total=len(jobs), disable=not progress, unit="img", desc="generate") as bar,
    ):
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            seeds = [seed + start + k for k in range(len(batch))]
            images = pipe(
                prompt=[prompt for _, prompt in batch],
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="pil",
                **kwargs,
            ).images
            for k, ((prompt_index, prompt), image_seed, image) in enumerate(
                zip(batch, seeds, images, strict=True)
            ):
                file_name = f"{start + k:06d}.png"
                image.save(out_dir / file_name)
                record = {
                    "file_name": file_name,
                    "prompt": prompt,
                    "prompt_index": prompt_index,
                    "seed": image_seed,
                    "settings": recorded,
                }
                metadata.write(json.dumps(record) + "\n")
                records.append(record)
            bar.update(len(batch))
    return records
