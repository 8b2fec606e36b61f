"""train_dreambooth_stella.py's dataset features (issue 16), offline on CPU with tiny pipelines: latent and text
caching, aspect-ratio buckets, --dataset_name, caption augmentation, --optimizer, EMA, validation loss; and the
quality benchmark's arms (peft's Riemannian-preconditioned LoRA, StelLA's function-preserving start)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from stella_diffusion.integrations.diffusers import NATIVE_WEIGHT_NAME, inject_adapter
from stella_diffusion.shapes.domain import INSTANCE_PROMPT
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs
from stella_diffusion.training import families
from stella_diffusion.training.adapters import make_adapter, read_saved_settings
from stella_diffusion.training.buckets import BucketBatchSampler, bucket_resolutions, nearest_bucket
from stella_diffusion.training.config import TrainingError
from stella_diffusion.training.data import CaptionSettings, DreamBoothDataset, collate_fn
from stella_diffusion.training.ema import EMA_WEIGHT_NAME
from stella_diffusion.training.optimizers import build_optimizer
from stella_diffusion.training.records import ImageRecord

from ._train_fixtures import (
    REPO,
    TINY_CONFIG,
    dreambooth_folder,
    run,
    tiny_args,
    train_script,
)
from .stock_runner import run_stock


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """Six images of four aspect ratios (no captions): DreamBooth with ``INSTANCE_PROMPT``."""
    folder = tmp_path_factory.mktemp("data") / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(32, 16), (16, 32), (16, 16), (24, 16), (32, 16), (16, 32)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


BUCKETS = ["--aspect_ratio_buckets", "--min_bucket_reso", "8", "--max_bucket_reso", "32", "--bucket_reso_steps", "8"]


# ---------------------------------------------------------------------------------------------------------------
# Caching


def test_cached_latents_and_text_embeddings_give_the_same_losses(sd_pipeline, style_dir, tmp_path):
    """Exactly (bit for bit): cached VAE distributions are sampled with the same RNG call and memory layout."""
    plain = run(tiny_args(sd_pipeline, style_dir, tmp_path / "plain", "--max_train_steps", "3"))
    cached = run(tiny_args(sd_pipeline, style_dir, tmp_path / "cached", "--max_train_steps", "3",
                           "--cache_latents", "--pre_compute_text_embeddings"))
    assert losses(cached) == losses(plain)
    assert len(set(losses(plain))) == 3


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_caching_gives_the_same_losses_on_every_family(kind, style_dir, tmp_path):
    """SDXL's two encoders, SD3's T5, Flux's shifted latents and batch-wide ``txt_ids``."""
    pipeline = build_tiny_pipeline(kind, tmp_path / kind)
    common = ["--max_train_steps", "2", "--max_sequence_length", "16"]
    plain = run(tiny_args(pipeline, style_dir, tmp_path / "plain", *common))
    cached = run(tiny_args(pipeline, style_dir, tmp_path / "cached", *common, "--cache_latents",
                           "--pre_compute_text_embeddings"))
    assert losses(cached) == losses(plain)


def test_cache_dir_is_reused_and_invalidated(sd_pipeline, style_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["--max_train_steps", "1", "--cache_latents", "--pre_compute_text_embeddings", "--cache_dir", str(cache)]
    first = run(tiny_args(sd_pipeline, style_dir, tmp_path / "a", *common))
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(n.split("-")[0] for n in files) == ["latents", "text"]
    assert all(n.endswith(".safetensors") for n in files)
    second = run(tiny_args(sd_pipeline, style_dir, tmp_path / "b", *common))
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # reused, not rewritten
    assert losses(second) == losses(first)
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "c", *common, "--random_flip"))  # augmentation changed
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "d", *common, "--resolution", "8"))  # resolution changed
    sorted(style_dir.glob("*.png"))[0].touch()  # an image changed (its modification time)
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "e", *common))
    names = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert names == ["latents"] * 4 + ["text"]  # new latents each time; the prompts never changed


# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def test_bucket_sampler_is_one_bucket_per_batch_and_depends_only_on_seed_and_epoch(mixed_dir):
    sizes = bucket_resolutions(16, 8, 32, 8)
    assert (16, 16) in sizes and (32, 8) in sizes and all(h * w <= 256 for h, w in sizes)
    assert nearest_bucket((200, 100), sizes) == (24, 8)  # 2:1 lies between 3:1 and 1:1, nearer 3:1 in log scale
    records = [ImageRecord(p, "x") for p in sorted(mixed_dir.glob("*.png"))]
    dataset = DreamBoothDataset(records, size=16, seed=0, bucket_of=lambda s: nearest_bucket(s, sizes))
    sampler = BucketBatchSampler(dataset.item_buckets(), batch_size=2, seed=0)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
        for batch in batches:
            assert len({dataset.item_buckets()[i] for i in batch}) == 1
            pixels = collate_fn([dataset[i] for i in batch])["pixel_values"]  # stacks: one shape
            assert tuple(pixels.shape[-2:]) == dataset.item_buckets()[batch[0]]
        epochs.append(batches)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]
    assert len({dataset.item_buckets()[i] for i in range(len(dataset))}) == 3  # tall, wide, square


def test_buckets_train_with_caching_and_sdxl_gets_the_true_sizes(mixed_dir, tmp_path, monkeypatch):
    pipeline = build_tiny_pipeline("sdxl", tmp_path / "sdxl")
    seen = []
    real = families.StableDiffusionXLFamily.image_conditioning

    def spy(self, batch, device):
        seen.append((batch["latent_parameters"].shape, batch["original_sizes"], batch["target_sizes"]))
        return real(self, batch, device)

    monkeypatch.setattr(families.StableDiffusionXLFamily, "image_conditioning", spy)
    records = run(tiny_args(pipeline, mixed_dir, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT, *BUCKETS,
                            "--cache_latents", "--max_train_steps", "6", "--no-center_crop"))
    assert all(np.isfinite(losses(records)))
    shapes = {shape[-2:] for shape, _, _ in seen}
    assert len(shapes) == 3
    for shape, originals, targets in seen:
        assert all(tuple(t) == (shape[-2] * 2, shape[-1] * 2) for t in targets)  # the tiny VAE halves the sides
        assert {tuple(o) for o in originals} <= {(32, 16), (16, 32), (16, 16), (24, 16)}


def test_resume_with_buckets_gives_the_same_losses(sd_pipeline, mixed_dir, tmp_path):
    """The bucket batch sampler through accelerate's prepare and skip_first_batches, across an epoch boundary."""
    common = ["--instance_prompt", INSTANCE_PROMPT, *BUCKETS, "--train_batch_size", "1", "--random_flip",
              "--no-center_crop", "--learning_rate", "5e-2", "--lr_scheduler", "constant"]
    straight = run(tiny_args(sd_pipeline, mixed_dir, tmp_path / "straight", *common, "--max_train_steps", "8"))
    run(tiny_args(sd_pipeline, mixed_dir, tmp_path / "halves", *common, "--max_train_steps", "4"))
    resumed = run(tiny_args(sd_pipeline, mixed_dir, tmp_path / "halves", *common, "--max_train_steps", "8",
                            "--resume_from_checkpoint", "latest", "--checkpointing_steps", "4"))
    assert losses(resumed) == losses(straight)


# ---------------------------------------------------------------------------------------------------------------
# Data and captions


def test_caption_dropout_one_feeds_only_empty_prompts(style_dir):
    records = [ImageRecord(p, "a, b") for p in sorted(style_dir.glob("*.png"))]
    dataset = DreamBoothDataset(records, size=16, seed=0, captions=CaptionSettings(dropout_rate=1.0), repeats=2)
    assert len(dataset) == 2 * len(records)
    assert {dataset[i]["instance"]["prompt"] for i in range(len(dataset))} == {""}
    kept = DreamBoothDataset(records, size=16, seed=0, captions=CaptionSettings(dropout_rate=0.0))
    assert {kept[i]["instance"]["prompt"] for i in range(len(kept))} == {"a, b"}


def test_shuffle_caption_keeps_the_first_tags(style_dir):
    record = ImageRecord(sorted(style_dir.glob("*.png"))[0], "sks star, red, large, center, outlined")
    dataset = DreamBoothDataset([record], size=16, seed=0, captions=CaptionSettings(shuffle=True, keep_tokens=1))
    prompts = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        prompt = dataset[0]["instance"]["prompt"]
        tags = prompt.split(", ")
        assert tags[0] == "sks star" and sorted(tags[1:]) == ["center", "large", "outlined", "red"]
        prompts.add(prompt)
    assert len(prompts) > 1


def test_dataset_name_reads_a_local_imagefolder(sd_pipeline, style_dir, tmp_path):
    preset = tmp_path / "preset.yaml"  # the tiny preset without its --instance_data_dir
    preset.write_text("".join(line for line in TINY_CONFIG.read_text().splitlines(keepends=True)
                              if not line.startswith("instance_data_dir:")))
    argv = tiny_args(sd_pipeline, style_dir, tmp_path / "out", "--max_train_steps", "2")
    argv[argv.index("--config") + 1] = str(preset)
    at = argv.index("--instance_data_dir")
    argv[at : at + 2] = ["--dataset_name", str(style_dir)]
    records = run(argv)
    assert [r["step"] for r in records] == [1, 2]
    bad = [*argv, "--image_column", "picture"]
    with pytest.raises(TrainingError, match="has no column 'picture'"):
        run(bad)


def test_a_captioned_folder_with_an_instance_prompt_is_refused(sd_pipeline, style_dir, tmp_path):
    with pytest.raises(TrainingError, match="pass --caption_column to use the captions or remove metadata.jsonl"):
        run(tiny_args(sd_pipeline, style_dir, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT))


# ---------------------------------------------------------------------------------------------------------------
# Optimizers, EMA, validation loss

LEARNING_RATES = {"adamw": "5e-2", "adamw8bit": "5e-2", "prodigy": "1.0", "adafactor": "5e-2", "sgd": "3.0"}


@pytest.mark.parametrize("optimizer", list(LEARNING_RATES))
def test_each_optimizer_lowers_the_validation_loss_and_keeps_u_v_orthonormal(optimizer, sd_pipeline, tmp_path):
    """Two images trained on and validated on (fixed noise and timesteps): the loss must go down."""
    package = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}.get(optimizer)
    if package is not None:
        pytest.importorskip(package, reason=f"--optimizer {optimizer} needs {package}")
    data = dreambooth_folder(tmp_path / "data", n=2)
    records = run(tiny_args(sd_pipeline, data, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT,
                            "--optimizer", optimizer, "--learning_rate", LEARNING_RATES[optimizer],
                            "--lr_scheduler", "constant", "--max_train_steps", "12", "--validation_split", str(data),
                            "--validation_epochs", "1", "--checkpointing_steps", "100"))
    validation = [r["validation_loss"] for r in records if "validation_loss" in r]
    assert len(validation) == 12
    assert validation[-1] < validation[0], validation
    assert max(r["orthonormality_error"] for r in records) <= 1e-5


def test_use_8bit_adam_is_an_alias_and_missing_packages_are_one_error(monkeypatch):
    script = train_script()
    args = script.parse_args(["--config", str(TINY_CONFIG), "--use_8bit_adam"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TrainingError, match=r"--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes`"):
        script.config.check_args(args)
    with pytest.raises(TrainingError, match=r"--optimizer prodigy needs prodigyopt"):
        script.config.check_args(script.parse_args(["--config", str(TINY_CONFIG), "--optimizer", "prodigy"]))


def test_validation_split_fraction_logs_a_validation_loss(sd_pipeline, style_dir, tmp_path):
    records = run(tiny_args(sd_pipeline, style_dir, tmp_path / "out", "--validation_split", "0.25",
                            "--validation_epochs", "1", "--max_train_steps", "3", "--train_batch_size", "1",
                            "--text_encoder_lr", "1e-3", "--train_text_encoder"))
    validation = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in validation] == [3]  # 3 training images, batch 1: one epoch
    assert np.isfinite(validation[0]["validation_loss"])


def test_resume_restores_the_ema(sd_pipeline, style_dir, tmp_path):
    """The EMA travels in the checkpoints: a resumed run exports the same average as a straight run."""
    common = ["--use_ema", "--ema_decay", "0.9", "--learning_rate", "5e-2", "--lr_scheduler", "constant"]
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "straight", *common, "--max_train_steps", "4"))
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "halves", *common, "--max_train_steps", "2"))
    run(tiny_args(sd_pipeline, style_dir, tmp_path / "halves", *common, "--max_train_steps", "4",
                  "--resume_from_checkpoint", "latest"))
    ours, reference = (load_file(tmp_path / d / NATIVE_WEIGHT_NAME) for d in ("halves", "straight"))
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0)


@pytest.mark.slow
def test_ema_export_is_a_valid_stella_adapter_that_a_stock_pipeline_loads(sd_pipeline, style_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_args(sd_pipeline, style_dir, out, "--use_ema", "--ema_decay", "0.5", "--max_train_steps", "4",
                  "--learning_rate", "5e-2", "--checkpointing_steps", "4"))
    ema, trained = load_file(out / NATIVE_WEIGHT_NAME), load_file(out / "checkpoint-4" / NATIVE_WEIGHT_NAME)
    assert (out / "checkpoint-4" / EMA_WEIGHT_NAME).is_file()
    assert ema.keys() == trained.keys()
    assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-4  # the average, not the last step
    for key, factor in ema.items():
        if key.endswith(("stella_U", "stella_Vt")):
            tall = factor if factor.shape[0] >= factor.shape[1] else factor.T
            assert float((tall.T @ tall - torch.eye(tall.shape[1])).abs().max()) <= 1e-5, key
    images = run_stock(sd_pipeline, out, "a red circle", **default_generation_kwargs("sd"))
    assert np.abs(images["loaded"] - images["base"]).max() > 1e-3


@pytest.mark.slow
def test_caching_benchmark_runs_and_writes_its_json(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "caching.py"), "--steps", "2", "--warmup", "1",
                           "--repeats", "1", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "caching.json").read_text())
    assert {(r["adapter"], r["cached"]) for r in result["rows"]} == {(a, c) for a in ("stella", "lora")
                                                                     for c in (False, True)}
    assert all(r["median_step_s"] > 0 and r["peak_mib"] > 0 for r in result["rows"])
    assert set(result["summary"]) == {"stella", "lora"} and "| stella | cached |" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# The quality benchmark's arms: peft's Riemannian-preconditioned LoRA, StelLA's function-preserving start


def test_lora_riemannian_preconditioner_steps_by_the_preconditioned_gradient():
    """One SGD step of ``--lora_riemannian_preconditioner``: A moves by (BᵀB + 0.01 I)⁻¹ g_A, B by
    g_B (AAᵀ + 0.01 I)⁻¹ (peft's damping), with the gradients of the old factors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    inject_adapter(model, LoraConfig(r=3, target_modules=["0"], init_lora_weights="gaussian"))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    args = SimpleNamespace(lora_riemannian_preconditioner=True, optimizer="sgd", learning_rate=0.1,
                           adam_weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           text_encoder_lr=None)
    optimizer = build_optimizer({"unet": model}, "unet", args)
    model(torch.randn(4, 6)).square().sum().backward()
    a0, b0, grad_a, grad_b = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    optimizer.step()
    eye = torch.eye(3)
    torch.testing.assert_close(a.detach(), a0 - 0.1 * torch.linalg.pinv(b0.T @ b0 + 0.01 * eye) @ grad_a)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * grad_b @ torch.linalg.pinv(a0 @ a0.T + 0.01 * eye))


def test_lora_riemannian_preconditioner_refuses_what_it_cannot_build():
    script = train_script()
    for extra, message in [(["--adapter", "stella"], "for the peft baselines"),
                           (["--adapter", "lora", "--optimizer", "adafactor"], "use --optimizer adamw or sgd"),
                           (["--adapter", "lora", "--text_encoder_lr", "1e-4"], "without --text_encoder_lr")]:
        args = script.parse_args(["--config", str(TINY_CONFIG), "--lora_riemannian_preconditioner", *extra])
        with pytest.raises(TrainingError, match=message):
            script.config.check_args(args)


def test_lora_riemannian_preconditioner_trains_and_exports(sd_pipeline, style_dir, tmp_path):
    out = tmp_path / "out"
    records = run(tiny_args(sd_pipeline, style_dir, out, "--adapter", "lora", "--lora_riemannian_preconditioner",
                            "--max_train_steps", "3", "--learning_rate", "1e-2", "--checkpointing_steps", "100"))
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in load_file(
        out / "pytorch_lora_weights.safetensors").items())


def test_function_preserving_start_equals_the_base_and_is_kept_for_resumes(sd_pipeline, style_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(sd_pipeline / "unet")
    inputs = (torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, unet.config.cross_attention_dim))
    with torch.no_grad():
        base = unet(*inputs).sample
        make_adapter(adapter="stella", rank=4, stella_function_preserving=True).add_to("unet", unet)
        torch.testing.assert_close(unet(*inputs).sample, base, rtol=0, atol=1e-6)

    out = tmp_path / "out"
    common = ["--stella_function_preserving", "--rank", "4", "--checkpointing_steps", "2"]
    run(tiny_args(sd_pipeline, style_dir, out, *common, "--max_train_steps", "2"))
    assert read_saved_settings(out)["stella_function_preserving"] is True
    ranks = {value.shape[0] for key, value in load_file(out / "pytorch_lora_weights.safetensors").items()
             if key.endswith("lora_A.weight")}
    assert ranks == {8}  # ΔW − ΔW₀: the trained factors and the subtracted start, rank 2r
    script = train_script()
    with pytest.raises(TrainingError, match="stella_function_preserving"):
        script.main(script.parse_args(tiny_args(sd_pipeline, style_dir, out, "--rank", "4", "--max_train_steps", "4",
                                                "--resume_from_checkpoint", "latest")))
