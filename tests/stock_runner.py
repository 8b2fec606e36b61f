"""Test helper: load a LoRA export into a stock pipeline in a separate Python process."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPT = Path(__file__).with_name("stock_pipeline_script.py")


def run_stock(
    pipeline_dir: str | Path, lora_dir: str | Path, prompt: str, seed: int = 0, **generation_kwargs: Any
) -> dict[str, np.ndarray]:
    """Images of a stock pipeline: ``base``, ``loaded`` (the export), ``weight0`` (set_adapters weight 0),
    ``unloaded`` (unload_lora_weights) and ``fused`` (fuse_lora), generated with ``seed``."""
    out = Path(lora_dir) / "stock_images.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # the parent's thread count: float32 sums are ordered by it, and the images are compared bit for bit
    cmd = [sys.executable, str(SCRIPT), "--num_threads", str(torch.get_num_threads()),
           "--pipeline", str(pipeline_dir), "--lora", str(lora_dir),
           "--prompt", prompt, "--seed", str(seed), "--generation_kwargs", json.dumps(generation_kwargs),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"stock pipeline process failed:\n{proc.stderr[-4000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}
