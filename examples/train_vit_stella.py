#!/usr/bin/env python
"""Fine-tune a ViT image classifier with StelLA and with peft's LoRA through the transformers Trainer, side by side.

The task is offline: the project's procedural shapes domain (`stella_diffusion.shapes.domain`: flat coloured circles,
squares, triangles and crosses of two sizes at five positions on two backgrounds), classified by one attribute
(``--label_attribute``, default the shape; the held-out star never appears in the pretrain split, so it is an
unused class). Images are scaled to [-1, 1], the normalisation of Google's ViT checkpoints. Both methods adapt the
same layers (the ViT preset: q/k/v, attention output and both MLP layers) and train the classifier head in full
(``modules_to_save``), as peft's image classification guide does.

The base model is ``--model_name_or_path`` (e.g. ``google/vit-base-patch16-224-in21k``; needs the hub) or, offline,
one built with random weights from ``--model_config``. The script prints a markdown table (loss, accuracy, step
time) and writes ``<output_dir>/results.json``.

    python examples/train_vit_stella.py --config configs/vit-tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from _common import add_comparison_args, build_config, parse_args, preset_target_modules, report, run_method
from transformers import AutoModelForImageClassification, EvalPrediction

from stella_diffusion.shapes import domain

LABEL_ATTRIBUTES = ("shape", "colour", "size", "position", "background")  # "style" is constant in the pretrain split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--label_attribute", choices=LABEL_ATTRIBUTES, default="shape")
    data.add_argument("--num_train_images", type=int, default=2048)
    data.add_argument("--num_eval_images", type=int, default=512)
    return parser


def shapes_dataset(n: int, seed: int, attribute: str, resolution: int) -> list[dict[str, Any]]:
    """``n`` rendered shapes (the domain's pretrain split) as ViT inputs in [-1, 1] with the attribute's label."""
    examples = []
    for spec in domain.sample_specs(n, seed):
        pixels = torch.from_numpy(np.asarray(domain.render(spec, resolution), dtype=np.float32))
        examples.append({"pixel_values": pixels.permute(2, 0, 1) / 127.5 - 1.0, "labels": spec.labels()[attribute]})
    return examples


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    config = build_config(args, num_labels=len(domain.ATTRIBUTES[args.label_attribute]))
    args.target_modules = args.target_modules or preset_target_modules(AutoModelForImageClassification, config)
    data = {
        "train_dataset": shapes_dataset(args.num_train_images, args.seed, args.label_attribute, config.image_size),
        "eval_dataset": shapes_dataset(args.num_eval_images, args.seed + 1, args.label_attribute, config.image_size),
    }
    results = [
        run_method(
            method, args, AutoModelForImageClassification, config,
            model_kwargs={"ignore_mismatched_sizes": True},  # a new head for our labels: created, not loaded
            peft_kwargs={"modules_to_save": ["classifier"]}, compute_metrics=compute_metrics, **data,
        )
        for method in args.methods
    ]  # fmt: skip
    return report(results, args, accuracy_name="accuracy")


if __name__ == "__main__":
    main()
