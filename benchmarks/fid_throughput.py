"""Throughput of our FID / KID path against torchmetrics' FrechetInceptionDistance, in one run.

Both see the same images (PNG files at another size, decoded and resized once by stella_diffusion.evaluation.images)
and the same feature extractor, fed in the same batches. Rows: torchmetrics FID on in-memory batches; ours
(StreamingFID) on the same batches, FID only and FID + KID; ours from the folders (decode + resize + FID +
KID, what eval/fid.py does). Ratio = torchmetrics' time ÷ ours (> 1: ours is faster), by wall and by CPU
time (the CPU time of all threads, less disturbed by other work on a shared machine).

    python benchmarks/fid_throughput.py [--num_images 256] [--batch_size 32] [--repeats 3]
        [--inception_weights PATH] [--output_dir benchmarks/results]

Without --inception_weights the extractor is a small random conv net with Inception's 2048 outputs, so the
Fréchet distance costs what it costs with Inception while the forward pass stays cheap on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from stella_diffusion.evaluation.features import INCEPTION_IMAGE_SIZE
from stella_diffusion.evaluation.images import iter_image_batches
from stella_diffusion.evaluation.metrics import StreamingFID, compute_fid


class RandomConvFeatures(nn.Module):
    """Random-weight stand-in for Inception: uint8 images → 2048 features (128 channels × 4 × 4 cells)."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 7, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 128, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net(imgs.float() / 255)


def write_images(folder: Path, n: int, seed: int, shift: float) -> None:
    """Smooth random colour fields (320×240 PNG), so that the two sets differ in distribution."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.normal(shift, 1.0, size=(6, 8, 3))
        field = np.kron(low, np.ones((40, 40, 1))) + rng.normal(0, 0.3, size=(240, 320, 3))
        pixels = np.clip(128 + 60 * field, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def best_of(fn: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """Fastest wall and CPU (all threads) seconds of ``repeats`` runs, and the value.

    On a shared machine the minimum is the least disturbed run, and CPU time is less disturbed than wall time.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=256, help="images per set")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inception_weights", help="use the real FID Inception (torch-fidelity weights)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per method")
    parser.add_argument("--output_dir", default="benchmarks/results", help="where fid_throughput.json goes")
    args = parser.parse_args(argv)

    if args.inception_weights:
        metric = StreamingFID(inception_weights=args.inception_weights)
        feature, name = metric.feature, metric.convention["feature_extractor"]
    else:
        feature, name = RandomConvFeatures().eval(), "random conv (2048-d)"
    size = INCEPTION_IMAGE_SIZE

    def ours(kid_max_samples: int) -> StreamingFID:
        return StreamingFID(
            feature, feature_name=name, image_size=size, kid_max_samples=kid_max_samples, kid_subset_size=100
        )

    with tempfile.TemporaryDirectory() as tmp:
        real_dir, fake_dir = Path(tmp) / "real", Path(tmp) / "fake"
        write_images(real_dir, args.num_images, seed=0, shift=0.0)
        write_images(fake_dir, args.num_images, seed=1, shift=0.3)
        batches = {
            real: list(iter_image_batches(folder, size, args.batch_size))
            for real, folder in ((True, real_dir), (False, fake_dir))
        }
        with torch.no_grad():
            feature(batches[True][0])  # warm-up

        def in_memory(metric: StreamingFID | FrechetInceptionDistance) -> float:
            for real, chunks in batches.items():
                for batch in chunks:
                    metric.update(batch, real=real)
            value = metric.compute()
            return float(value["fid"] if isinstance(value, dict) else value)

        runs = {
            "torchmetrics FrechetInceptionDistance (in memory)": lambda: in_memory(
                FrechetInceptionDistance(feature=feature)
            ),
            "ours StreamingFID, FID only (in memory)": lambda: in_memory(ours(0)),
            "ours StreamingFID, FID + KID (in memory)": lambda: in_memory(ours(2048)),
            "ours compute_fid from folders (decode + resize + FID + KID)": lambda: compute_fid(
                fake_dir, real_dir, ours(2048), args.batch_size, progress=False
            )["fid"],
        }
        rows = []
        for label, run in runs.items():
            seconds, cpu_seconds, fid = best_of(run, args.repeats)
            rows.append({"method": label, "seconds": seconds, "cpu_seconds": cpu_seconds, "fid": fid})
    base = rows[0]
    for row in rows:
        row["images_per_s"] = 2 * args.num_images / row["seconds"]
        row["ratio_vs_torchmetrics"] = base["seconds"] / row["seconds"]
        row["cpu_ratio_vs_torchmetrics"] = base["cpu_seconds"] / row["cpu_seconds"]
        row["fid_rel_diff_vs_torchmetrics"] = abs(row["fid"] - base["fid"]) / abs(base["fid"])

    config = {
        "num_images_per_set": args.num_images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "image_size": size,
        "source_images": "320x240 PNG",
        "feature_extractor": name,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    n, threads = args.num_images, config["torch_threads"]
    print(f"FID throughput, {n} + {n} images, {name}, {threads} threads, best of {args.repeats}")
    print("| method | wall s | CPU s | images/s | ratio (wall) | ratio (CPU) | FID | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [
            row["method"],
            f"{row['seconds']:.2f}",
            f"{row['cpu_seconds']:.2f}",
            f"{row['images_per_s']:.1f}",
        ]
        cells += [f"{row[key]:.2f}" for key in ("ratio_vs_torchmetrics", "cpu_ratio_vs_torchmetrics")]
        cells += [f"{row['fid']:.4f}", f"{row['fid_rel_diff_vs_torchmetrics']:.1e}"]
        print("| " + " | ".join(cells) + " |")
    result = {"config": config, "rows": rows}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(args.output_dir, "fid_throughput.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
