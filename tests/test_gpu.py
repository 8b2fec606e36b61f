"""CUDA-only checks (skipped without a GPU, so CI's CPU run skips them): xformers attention under StelLA
adapters, and the demo trained in fp16 / bf16 (SDPA or xformers attention), whose export a stock pipeline loads."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from stella_diffusion.integrations.diffusers import LORA_WEIGHT_NAME, add_stella_adapter
from stella_diffusion.training.checkpoints import HISTORY_NAME
from stella_diffusion.training.outputs import EVAL_DIR

from ._devices import needs_cuda
from ._train_fixtures import REPO, SCRIPT

pytestmark = [pytest.mark.gpu, needs_cuda]

BASE = REPO / "stella_diffusion" / "shapes" / "assets" / "tiny-shapes-t2i"
DEMO_CONFIG = REPO / "configs" / "tiny-demo.yaml"


def _unet_output_and_adapter_grads(unet: UNet2DConditionModel, inputs: dict) -> tuple[torch.Tensor, list]:
    unet.zero_grad()
    out = unet(**inputs).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in unet.parameters() if p.requires_grad]


def _skip_unless_xformers_runs() -> None:
    """Skip where xformers is missing or has no CUDA kernel (a wheel built for another torch imports fine)."""
    ops = pytest.importorskip("xformers.ops")
    q = torch.zeros(1, 4, 1, 8, device="cuda", dtype=torch.float16)
    try:
        ops.memory_efficient_attention(q, q, q)
    except NotImplementedError as err:
        pytest.skip(f"xformers cannot run with torch {torch.__version__}: {str(err).splitlines()[0]}")


def test_xformers_attention_equals_default_attention_with_stella_adapters() -> None:
    _skip_unless_xformers_runs()
    unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet").cuda()
    unet.requires_grad_(False)
    add_stella_adapter(unet, r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for name, param in unet.named_parameters():
        if "stella_S" in name:  # a non-zero update, so the adapters change the attention inputs
            param.data.normal_(0, 0.5)
    g = torch.Generator("cuda").manual_seed(0)
    size = unet.config.sample_size
    inputs = {"sample": torch.randn(2, unet.config.in_channels, size, size, device="cuda", generator=g),
              "timestep": torch.tensor([10, 500], device="cuda"),
              "encoder_hidden_states": torch.randn(2, 12, unet.config.cross_attention_dim, device="cuda", generator=g)}
    reference, reference_grads = _unet_output_and_adapter_grads(unet, inputs)
    unet.enable_xformers_memory_efficient_attention()
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"XFormersAttnProcessor"}
    out, grads = _unet_output_and_adapter_grads(unet, inputs)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert len(grads) == len(reference_grads) > 0
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision, attention", [("fp16", "sdpa"), ("bf16", "sdpa"), ("fp16", "xformers")])
def test_demo_trains_in_mixed_precision_and_a_stock_pipeline_loads_the_export(precision, attention, tmp_path) -> None:
    xformers = attention == "xformers"
    if xformers:
        _skip_unless_xformers_runs()
    # a process per run, as users launch it: accelerate's state (mixed precision) is set once per process
    subprocess.run([
        sys.executable, str(SCRIPT), "--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path),
        "--max_train_steps", "60", "--mixed_precision", precision,
        *(["--enable_xformers_memory_efficient_attention"] if xformers else []),
        "--num_eval_images", "16", "--no-eval_base", "--num_validation_images", "2", "--validation_epochs", "1000",
        "--checkpointing_steps", "1000", "--report_to", "none",
    ], cwd=REPO, check=True, timeout=600)  # fmt: skip
    history = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert len(history) == 60 and all(math.isfinite(r["loss"]) for r in history)
    assert max(r["orthonormality_error"] for r in history) <= 1e-5  # the factors stay float32 on the manifold
    run = json.loads((tmp_path / EVAL_DIR / "report.json").read_text())["runs"][0]
    assert run["name"] == "stella" and math.isfinite(run["fid"])

    pipe = DiffusionPipeline.from_pretrained(BASE, torch_dtype=torch.float16).to("cuda")
    if xformers:
        pipe.enable_xformers_memory_efficient_attention()
    pipe.set_progress_bar_config(disable=True)
    generate = {"num_inference_steps": 4, "output_type": "pt", "guidance_scale": 2.0}
    prompt = "a large yellow sks shape on a black background, center"
    base = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0), **generate).images
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    tuned = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0), **generate).images
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 1e-2
