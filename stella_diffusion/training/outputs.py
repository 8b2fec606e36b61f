"""What a training run leaves for people: validation grids, the loss / orthonormality plot, the model card."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from diffusers.utils import make_image_grid
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from matplotlib.figure import Figure
from PIL import Image

from ..integrations.diffusers import LORA_WEIGHT_NAME
from ..integrations.lora_formats import WEIGHT_NAMES
from .adapters import Adapter

PLOT_NAME = "training_curves.png"
KOHYA_NAME, BFL_NAME = WEIGHT_NAMES["kohya"], WEIGHT_NAMES["bfl"]
EVAL_DIR = "eval"  # under --output_dir: the evaluation images and report


def save_image_row(images: Sequence[Image.Image], path: str | Path) -> Path:
    """The images side by side in one PNG (diffusers' ``make_image_grid``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(list(images), rows=1, cols=len(images)).save(path)
    return path


def smoothed(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (its "smoothing" slider), to read a noisy loss."""
    out, average = np.empty(len(values)), 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A PNG of the loss per step (raw and smoothed, and the validation loss where there is one) and of
    ``max|UᵀU − I|`` (StelLA only) on a log scale."""
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    errors = [r.get("orthonormality_error") for r in records]
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_orth = fig.subplots(1, 2)
    ax_loss.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    ax_loss.plot(steps, smoothed(losses), lw=1.5, label="smoothed (EMA 0.9)")
    validation = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    if validation:
        ax_loss.plot(*zip(*validation, strict=True), "o-", lw=1.2, label="validation (--validation_split)")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    if any(e is not None for e in errors):
        ax_orth.semilogy(steps, [max(e, 1e-12) if e is not None else float("nan") for e in errors], lw=0.8)
        ax_orth.set(xlabel="step", ylabel="max |UᵀU − I|, |VᵀV − I|", title="orthonormality error")
    else:
        ax_orth.text(0.5, 0.5, "no orthonormal factors\n(peft baseline)", ha="center", va="center")
        ax_orth.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def kohya_training_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The training settings kohya-based tools show, under sd-scripts' ``ss_*`` names (all strings)."""
    values = {
        "ss_learning_rate": args.learning_rate, "ss_lr_scheduler": args.lr_scheduler,
        "ss_max_train_steps": args.max_train_steps, "ss_batch_size_per_device": args.train_batch_size,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps, "ss_resolution": args.resolution,
        "ss_seed": args.seed, "ss_mixed_precision": args.mixed_precision or "no",
        "ss_training_comment": f"stella-diffusion, adapter {args.adapter}",
    }
    return {key: str(value) for key, value in values.items()}


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str,
    family: str,
    adapter: Adapter,
    prompt: str | None,
    validation_prompt: str | None,
    images: Sequence[Image.Image] = (),
    settings: Mapping[str, Any] | None = None,
    evaluation: str | None = None,
) -> Path:
    """``README.md`` through diffusers' model-card helpers (as its DreamBooth scripts write it).

    Args:
        output_dir: the run's folder; the images are saved next to the card.
        base_model: the pipeline the adapter was trained on.
        family: the pipeline family's short name (a tag).
        adapter: the trained adapter (it describes itself).
        prompt: the DreamBooth instance prompt (``None`` for captioned fine-tuning).
        validation_prompt: the prompt of the example snippet and the images.
        images: validation images shown on the card.
        settings: training settings shown as a table.
        evaluation: a Markdown section (the post-training evaluation report) added at the end.
    """
    output_dir = Path(output_dir)
    image_lines = []
    for i, image in enumerate(images):
        image.save(output_dir / f"image_{i}.png")
        image_lines.append(f"![img_{i}](./image_{i}.png)")
    mode = f"DreamBooth on the prompt `{prompt}`" if prompt else "captioned fine-tuning"
    example = json.dumps(validation_prompt or prompt or "a photo")
    rows = "\n".join(f"| {k} | {v} |" for k, v in (settings or {}).items())
    images_text = "\n".join(image_lines) if image_lines else "(no --validation_prompt was given)"
    trained_text_encoder = adapter.settings.train_text_encoder
    description = f"""# {adapter.settings.adapter} adapter for {base_model}

Trained with `train_dreambooth_stella.py` ({mode}). {adapter.description} The text encoder was
{"" if trained_text_encoder else "not "}trained.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder", weight_name="{LORA_WEIGHT_NAME}")
image = pipe({example}).images[0]
```

| file | load it with |
|---|---|
| `{LORA_WEIGHT_NAME}` | diffusers (`load_lora_weights`) |
| `{KOHYA_NAME}` (if written) | ComfyUI, A1111 / Forge, kohya-based tools, diffusers |
| `{BFL_NAME}` (Flux, if written) | ComfyUI, Forge, diffusers |

## Validation images

{images_text}

## Training settings

| setting | value |
|---|---|
{rows}
"""
    if evaluation:
        description += "\n" + evaluation.replace("## ", "## Evaluation: ", 1)
    card = load_or_create_model_card(output_dir.name, from_training=True, base_model=base_model, prompt=prompt,
                                     model_description=description)
    card = populate_model_card(card, tags=["text-to-image", "diffusers", "diffusers-training", "lora",
                                           adapter.settings.adapter, family])
    path = output_dir / "README.md"
    card.save(path)
    return path
