"""The committed tiny text-to-image base and domain classifier: load offline, draw what they are asked for."""

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from stella_diffusion.shapes.classifier import (
    default_classifier_path,
    load_domain_classifier,
    prompted_accuracy,
)
from stella_diffusion.shapes.domain import ATTRIBUTES, SPLITS, ShapeSpec, render, sample_specs

BASE = Path(str(files("stella_diffusion.shapes") / "assets" / "tiny-shapes-t2i"))


def _images(specs: list[ShapeSpec]) -> torch.Tensor:
    pixels = np.stack([np.asarray(render(s)) for s in specs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipeline = DiffusionPipeline.from_pretrained(BASE)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def defaults() -> dict:
    return json.loads((BASE / "generation_defaults.json").read_text())


def test_assets_are_small() -> None:
    assert sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file()) <= 20 * 2**20
    assert default_classifier_path().stat().st_size <= 5 * 2**20
    assert (BASE / "TRAINING.md").exists()


def test_base_loads_offline_as_stable_diffusion(pipe: StableDiffusionPipeline, defaults: dict) -> None:
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == defaults["height"] == defaults["width"]
    assert "sks" in pipe.tokenizer.get_vocab() or "sks</w>" in pipe.tokenizer.get_vocab()


def test_base_accepts_an_attention_lora(pipe: StableDiffusionPipeline, tmp_path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = DiffusionPipeline.from_pretrained(BASE).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="check")
    try:
        assert "check" in pipe.get_active_adapters()
    finally:
        pipe.unload_lora_weights()


def test_classifier_is_accurate_on_fresh_images() -> None:
    classifier = load_domain_classifier()
    assert not classifier.training
    specs = [s for split in SPLITS for s in sample_specs(100, seed=424242, split=split)]
    images = _images(specs)
    accuracy = prompted_accuracy(classifier, images, specs, attributes=tuple(ATTRIBUTES))
    assert min(v for k, v in accuracy.items() if k != "all") >= 0.9, accuracy
    features = classifier.features(images[:4])
    assert features.ndim == 2 and features.shape[0] == 4


@pytest.mark.slow
def test_base_draws_the_prompted_shape_and_colour(pipe: StableDiffusionPipeline, defaults: dict) -> None:
    """The acceptance check of the embedded base: ≥ 80 % of generations show the prompted shape and colour."""
    expected = [c for c in defaults["check_prompts"] for _ in range(4)]
    images = pipe(
        [c["prompt"] for c in expected],
        height=defaults["height"],
        width=defaults["width"],
        num_inference_steps=defaults["num_inference_steps"],
        guidance_scale=defaults["guidance_scale"],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    predicted = load_domain_classifier().predict(images)
    hits = [
        shape == c["shape"] and colour == c["colour"]
        for shape, colour, c in zip(predicted["shape"], predicted["colour"], expected, strict=True)
    ]
    assert sum(hits) / len(hits) >= 0.8, (sum(hits), len(hits))


@pytest.mark.slow
def test_pretraining_script_makes_a_loadable_base_and_reports_the_vae_from_scratch_and_continued(tmp_path) -> None:
    """A few steps of scripts/pretrain_tiny_base.py (the script that made the committed base), then a second
    stage continued from the first: both save a pipeline and report a finite VAE reconstruction error."""
    import math
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_base.py"
    tiny = ["--threads", "1", "--images", "64", "--vae_steps", "2", "--steps", "2", "--batch_size", "4",
            "--vae_batch_size", "4", "--inference_steps", "2", "--guidance_scales", "2", "--check_per_prompt", "1"]
    stages = [["--output_dir", str(tmp_path / "stage1")],
              ["--output_dir", str(tmp_path / "stage2"), "--init_from", str(tmp_path / "stage1"), "--seed", "1"]]
    for stage in stages:
        done = subprocess.run([sys.executable, str(script), *tiny, *stage], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = json.loads(done.stdout[done.stdout.index("{\n"):])
        mse = stats["VAE reconstruction MSE (posterior mean, first 512 images, [-1, 1] scale)"]
        assert math.isfinite(mse) and mse > 0
        assert f"| {mse} |" in Path(stage[1], "TRAINING.md").read_text()
    continued = StableDiffusionPipeline.from_pretrained(tmp_path / "stage2")
    first = StableDiffusionPipeline.from_pretrained(tmp_path / "stage1")
    assert torch.equal(continued.vae.encoder.conv_in.weight, first.vae.encoder.conv_in.weight)
    assert not torch.equal(continued.unet.conv_in.weight, first.unet.conv_in.weight)
