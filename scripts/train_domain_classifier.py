"""Train the shapes-domain classifier (features for FID, per-attribute heads) on rendered images.

    python scripts/train_domain_classifier.py --seed 0

Trains on all three splits (pretrain, concept, style), with light noise / blur / contrast augmentation so
that it also judges the slightly imperfect images a diffusion model draws, then reports per-attribute
accuracy on fresh seeds and writes ``shapes-classifier.safetensors``, its json config and
``shapes-classifier-eval.json`` to the package assets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stella_diffusion.shapes.classifier import DomainClassifier, default_classifier_path
from stella_diffusion.shapes.domain import ATTRIBUTES, SPLITS, render, sample_specs

# Share of each split in training: the held-out shape and style must be as well known as the others.
SPLIT_WEIGHTS = {"pretrain": 0.5, "concept": 0.25, "style": 0.25}


def rendered_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` images in [0, 1] drawn from all splits, and their labels per attribute."""
    specs = []
    for split in SPLITS:
        specs += sample_specs(round(n * SPLIT_WEIGHTS[split]), seed, split)
    images = np.stack([np.asarray(render(s)) for s in specs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    labels = {k: torch.tensor([s.labels()[k] for s in specs]) for k in ATTRIBUTES}
    return x, labels


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, contrast change and pixel noise, each at random strength, as a diffusion sample might show."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=generator) * 0.6
    smoothed = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + blur * (smoothed - x)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    x = (x - 0.5) * contrast + 0.5
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(model: DomainClassifier, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction correct per attribute."""
    model.eval()
    logits = {k: [] for k in ATTRIBUTES}
    device = next(model.parameters()).device
    for batch in x.split(512):
        for k, v in model(batch.to(device)).items():
            logits[k].append(v.cpu())
    return {k: (torch.cat(v).argmax(-1) == labels[k]).float().mean().item() for k, v in logits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=default_classifier_path().parent,
                        help="the folder of the classifier files (default: the package assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=12000)
    parser.add_argument("--eval_images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    x, labels = rendered_set(args.train_images, args.seed)
    # Fresh seeds for evaluation: the split's RNG is keyed by seed, so these images are all new.
    x_eval, labels_eval = rendered_set(args.eval_images, args.seed + 10_000)

    model = DomainClassifier().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        model.train()
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=generator)
        logits = model(augment(x[idx], generator).to(args.device))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k][idx].to(args.device)) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)

    result = {
        "held_out_accuracy": accuracy(model, x_eval, labels_eval),
        "held_out_accuracy_augmented": accuracy(model, augment(x_eval, generator), labels_eval),
        "eval_images": x_eval.shape[0],
        "eval_seed": args.seed + 10_000,
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "wall_time_s": round(time.time() - start, 1),
        "final_loss": round(loss.item(), 5),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().save(args.output_dir / default_classifier_path().name)
    eval_path = args.output_dir / "shapes-classifier-eval.json"
    eval_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
