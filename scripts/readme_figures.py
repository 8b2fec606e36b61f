#!/usr/bin/env python
"""The README's figures of the embedded base: docs/base-samples.png and docs/tiny-demo.png.

    python train_dreambooth_stella.py --config configs/tiny-demo.yaml   # first: the demo run
    python scripts/readme_figures.py

``base-samples.png``: the committed base on its check prompts (generation_defaults.json), 6 seeds each, with the
shape and colour the domain classifier reads. ``tiny-demo.png``: the first evaluation images of the demo run,
base above fine-tune, on the same prompts and seeds (read from ``--demo_dir``/eval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from stella_diffusion.evaluation.generation import load_pipeline
from stella_diffusion.shapes.classifier import load_domain_classifier

BASE = Path(__file__).resolve().parents[1] / "stella_diffusion" / "shapes" / "assets" / "tiny-shapes-t2i"


def base_samples(path: Path, seeds: int = 6) -> float:
    """Grid of the check prompts × ``seeds``; returns the share with the prompted shape and colour."""
    defaults = json.loads((BASE / "generation_defaults.json").read_text())
    checks = defaults["check_prompts"]
    pipe = load_pipeline(BASE)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([c["prompt"] for c in checks for _ in range(seeds)], height=defaults["height"],
                  width=defaults["width"], num_inference_steps=defaults["num_inference_steps"],
                  guidance_scale=defaults["guidance_scale"], generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    predicted = load_domain_classifier().predict(images)
    fig = Figure(figsize=(1.1 * seeds + 3.2, 1.1 * len(checks)))
    axes = fig.subplots(len(checks), seeds, squeeze=False)
    hits = 0
    for i, check in enumerate(checks):
        for j in range(seeds):
            k = i * seeds + j
            ok = (predicted["shape"][k], predicted["colour"][k]) == (check["shape"], check["colour"])
            hits += ok
            ax = axes[i][j]
            ax.imshow(images[k].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("tab:green" if ok else "tab:red")
                spine.set_linewidth(2)
        axes[i][0].set_ylabel(check["prompt"].replace(" on a ", "\non a "), rotation=0, ha="right", va="center",
                              fontsize=7)
    share = hits / len(images)
    fig.suptitle(f"tiny-shapes-t2i, guidance {defaults['guidance_scale']}: prompted shape and colour in "
                 f"{share:.0%} (green frame: the classifier agrees)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return share


def demo_comparison(demo_dir: Path, path: Path, count: int = 10) -> None:
    """First ``count`` evaluation images of the demo: base (top) and the StelLA fine-tune (bottom)."""
    rows = {}
    for name in ("base", "stella"):
        files = sorted(Path(demo_dir, "eval", name).glob("*.png"))[:count]
        if not files:
            raise FileNotFoundError(f"No images in {demo_dir}/eval/{name}: run the demo first.")
        rows[name] = np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in files], axis=1)
    prompts = [json.loads(line)["prompt"] for line in
               Path(demo_dir, "eval", "stella", "metadata.jsonl").read_text().splitlines()[:count]]
    fig = Figure(figsize=(1.0 * count, 2.6))
    axes = fig.subplots(2, 1)
    for ax, (name, row) in zip(axes, rows.items(), strict=True):
        ax.imshow(row, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle("same prompts and seeds, e.g. " + json.dumps(prompts[0]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/tiny-demo")
    parser.add_argument("--output_dir", default="docs")
    args = parser.parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    share = base_samples(Path(args.output_dir, "base-samples.png"))
    print(f"base samples: prompted shape and colour in {share:.1%}")
    demo_comparison(Path(args.demo_dir), Path(args.output_dir, "tiny-demo.png"))
    print(f"Wrote {args.output_dir}/base-samples.png and {args.output_dir}/tiny-demo.png")


if __name__ == "__main__":
    main()
