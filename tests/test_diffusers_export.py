"""Trained StelLA adapters on tiny SD / SDXL / SD3 / Flux pipelines, exported and loaded by stock diffusers.

The stock side runs in a separate process that never imports stella_diffusion (tests/stock_pipeline_script.py).
"""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from stella_diffusion import StellaLayer, create_stella_optimizer
from stella_diffusion.integrations.diffusers import (
    add_stella_adapter,
    load_stella_into_pipeline,
    pipeline_components,
    save_stella_checkpoint,
)
from stella_diffusion.integrations.lora_formats import save_lora_export
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs

from .stock_runner import run_stock

PROMPT = "a red circle"
# text encoders that get adapters too (T5 stays frozen: diffusers' savers have no slot for it)
TEXT_ENCODERS = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "sd3": ["text_encoder"],
                 "flux": ["text_encoder"]}


def _train_a_little(components: dict[str, torch.nn.Module], steps: int = 3) -> None:
    """A few Riemannian AdamW steps pulling every ΔW towards a random target, so the factors really move."""
    models = list(components.values())
    for model in models:
        model.requires_grad_(False)
        for layer in (m for m in model.modules() if isinstance(m, StellaLayer)):
            for p in (layer.stella_U["default"], layer.stella_S["default"], layer.stella_Vt["default"]):
                p.requires_grad_(True)
    wrapper = torch.nn.ModuleList(models)
    optimizer = create_stella_optimizer(wrapper, torch.optim.AdamW, lr=0.05)
    layers = [m for m in wrapper.modules() if isinstance(m, StellaLayer)]
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(layer.get_delta_weight("default").shape, generator=g) for layer in layers]
    for _ in range(steps):
        pairs = zip(layers, targets, strict=True)
        loss = sum(((layer.get_delta_weight("default") - t) ** 2).mean() for layer, t in pairs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.stella.orthonormality_error() < 1e-5


def _generate(pipe, kind: str) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return np.asarray(pipe(PROMPT, generator=generator, **default_generation_kwargs(kind)).images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_stock_pipeline_reproduces_stella_images(kind, tmp_path):
    base_dir = build_tiny_pipeline(kind, tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    base_images = _generate(pipe, kind)
    denoiser = "unet" if kind in ("sd", "sdxl") else "transformer"
    names = [denoiser, *TEXT_ENCODERS[kind]]
    for name in names:
        add_stella_adapter(getattr(pipe, name), r=4, alpha=4)
    components = {name: getattr(pipe, name) for name in names}
    _train_a_little(components)
    stella_images = _generate(pipe, kind)
    export_dir = tmp_path / "export"
    save_lora_export(export_dir, type(pipe), components)
    save_stella_checkpoint(export_dir, components)

    stock = run_stock(base_dir, export_dir, PROMPT, seed=0, **default_generation_kwargs(kind))
    np.testing.assert_array_equal(stock["base"], base_images)
    assert np.abs(stock["loaded"] - base_images).max() > 1e-3, "the adapter must change the images"
    assert np.abs(stock["loaded"] - stella_images).max() <= 1e-5
    assert np.abs(stock["fused"] - stella_images).max() <= 1e-5
    np.testing.assert_array_equal(stock["weight0"], base_images)
    np.testing.assert_array_equal(stock["unloaded"], base_images)

    # the native checkpoint, loaded into a fresh pipeline as live StelLA layers, gives the same images
    fresh = DiffusionPipeline.from_pretrained(base_dir)
    fresh.set_progress_bar_config(disable=True)
    load_stella_into_pipeline(fresh, export_dir)
    assert set(pipeline_components(fresh)) >= set(names)
    np.testing.assert_array_equal(_generate(fresh, kind), stella_images)
