"""train_dreambooth_stella.py on tiny pipelines, offline on CPU: end to end, resume, data modes, adapters, errors.

The script is called in-process (``main(parse_args([...]))``) for speed, and once as a real subprocess; the
stock side of "a stock pipeline loads the export" always runs in a separate process (tests/stock_runner.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from stella_diffusion.files import UnreadableImageWarning
from stella_diffusion.integrations.diffusers import LORA_WEIGHT_NAME, NATIVE_WEIGHT_NAME
from stella_diffusion.integrations.lora_formats import save_lora_formats
from stella_diffusion.shapes.domain import INSTANCE_PROMPT
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs
from stella_diffusion.training.adapters import (
    PEFT_WEIGHT_NAME,
    make_adapter,
    read_saved_settings,
)
from stella_diffusion.training.checkpoints import HISTORY_NAME, save_checkpoint
from stella_diffusion.training.config import TrainingError
from stella_diffusion.training.families import FAMILIES
from stella_diffusion.training.model_setup import enable_xformers
from stella_diffusion.training.outputs import PLOT_NAME
from stella_diffusion.training.records import captioned_records, folder_images

from ._train_fixtures import (
    PROMPT,
    REPO,
    SCRIPT,
    TINY_CONFIG,
    captioned_folder,
    dreambooth_folder,
    history,
    run,
    tiny_args,
    train_script,
)
from .stock_runner import run_stock

# ---------------------------------------------------------------------------------------------------------------
# Arguments and bad input: each is one clear error before any model is loaded


def test_config_values_are_defaults_that_flags_override():
    script = train_script()
    args = script.parse_args(["--config", str(TINY_CONFIG), "--learning_rate", "0.1", "--no-center_crop",
                              "--adapter", "dora"])
    assert (args.learning_rate, args.center_crop, args.adapter) == (0.1, False, "dora")  # overridden
    assert (args.rank, args.lora_alpha, args.resolution, args.mixed_precision) == (4, 4.0, 16, "no")  # from YAML
    assert args.max_train_steps == 4 and args.lr_scheduler == "cosine"
    paper = script.parse_args(["--config", str(REPO / "configs" / "sd15-style-stella.yaml")])
    assert (paper.learning_rate, paper.train_batch_size, paper.num_train_epochs, paper.rank) == (8e-4, 8, 100, 4)
    assert paper.lora_layers == "to_q,to_k,to_v,to_out.0" and paper.adam_weight_decay == 0.01
    assert script.parse_args(["--config", str(REPO / "configs" / "sd15-style-lora.yaml")]).learning_rate == 1e-4


@pytest.mark.parametrize(
    ("text", "message"),
    [("learning_rat: 0.1\n", "unknown key 'learning_rat'"),
     ("mixed_precision: no\n", "quote the value"),
     ("- a list\n", "must be a mapping")],
)
def test_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TrainingError, match=message):
        train_script().parse_args(["--config", str(path)])


def test_non_images_are_skipped_with_a_warning_naming_them(tmp_path):
    folder = dreambooth_folder(tmp_path / "data", n=2)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UnreadableImageWarning) as caught:
        images = folder_images(folder)
    assert len(images) == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "notes.txt" in messages and "broken.png" in messages


def test_captioned_metadata_rows_are_checked_line_by_line(tmp_path):
    folder = captioned_folder(tmp_path / "data", n=3)
    metadata = folder / "metadata.jsonl"
    rows = metadata.read_text().splitlines()
    assert [r.prompt for r in captioned_records(folder)] == [json.loads(row)["text"] for row in rows]

    metadata.write_text("\n".join([rows[0], "", rows[1], '{"file_name": "x.png"']) + "\n")
    with pytest.raises(TrainingError, match=r"metadata.jsonl:4 is not a JSON object"):
        captioned_records(folder)
    metadata.write_text("\n".join([rows[0], '{"file_name": "0001.png"}']) + "\n")
    with pytest.raises(TrainingError, match=r"line 2 needs 'file_name' and the caption column 'text'"):
        captioned_records(folder)
    metadata.write_text("\n".join([rows[0], json.dumps({"file_name": "gone.png", "text": "a"})]) + "\n")
    with pytest.warns(UnreadableImageWarning, match="gone.png"):
        assert len(captioned_records(folder)) == 1


def test_xformers_that_cannot_run_is_one_clear_error():
    """An xformers wheel built for another torch imports, but diffusers' probe finds no kernel (seen on an H100)."""

    def no_kernel() -> None:
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    denoiser = SimpleNamespace(enable_xformers_memory_efficient_attention=no_kernel)
    with pytest.raises(TrainingError, match=r"xformers cannot run here \(No operator found for .*\)\. It needs"):
        enable_xformers(denoiser)


def _adapted_unet(pipeline_dir, rank: int):
    """The pipeline's UNet with a StelLA adapter of ``rank`` on the script's default targets."""
    unet = DiffusionPipeline.from_pretrained(pipeline_dir).unet
    make_adapter(adapter="stella", rank=rank).add_to("unet", unet)
    return unet


def _bad_inputs(sd_pipeline, concept_dir, tmp_path):
    """(case name, extra arguments or a data folder, expected message) for each bad input of the issue."""
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    not_a_pipeline = tmp_path / "not-a-pipeline"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "unet.safetensors").write_bytes(b"")
    other = make_adapter(adapter="stella", rank=8, alpha=4.0)
    unet = _adapted_unet(sd_pipeline, 8)
    checkpoint = save_checkpoint(tmp_path / "out", 2, lambda folder: other.save(folder, {"unet": unet}),
                                 {"loss": 0.5}, healthy=True)
    return {
        "missing data folder": (tmp_path / "nowhere", [], "no such folder"),
        "empty data folder": (empty, [], "is empty"),
        "no image in the folder": (junk, [], "holds no readable image"),
        "not a pipeline": (concept_dir, ["--pretrained_model_name_or_path", str(not_a_pipeline)],
                           "is not a diffusers pipeline folder"),
        "rank 0": (concept_dir, ["--rank", "0"], "--rank must be a positive integer"),
        "pissa on a convolution": (concept_dir, ["--adapter", "pissa", "--lora_layers", "to_q,proj_in"],
                                   r"--adapter pissa cannot adapt convolutions .* 'proj_in' matches unet\..*proj_in "
                                   r"\(Conv2d\)"),
        "resume with another rank": (concept_dir, ["--resume_from_checkpoint", str(checkpoint)],
                                     r"different adapter configuration: rank 8 \(checkpoint\) vs 4 \(requested\)"),
    }


@pytest.mark.parametrize("case", ["missing data folder", "empty data folder", "no image in the folder",
                                  "not a pipeline", "rank 0", "pissa on a convolution", "resume with another rank"])
def test_bad_input_gives_one_clear_error(case, sd_pipeline, concept_dir, tmp_path):
    data, extra, message = _bad_inputs(sd_pipeline, concept_dir, tmp_path)[case]
    argv = tiny_args(sd_pipeline, data, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT, *extra)
    with pytest.warns(UnreadableImageWarning) if case == "no image in the folder" else contextlib.nullcontext():
        with pytest.raises(TrainingError, match=message):
            run(argv)
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_line_and_a_nonzero_exit(sd_pipeline, concept_dir, tmp_path):
    argv = tiny_args(sd_pipeline, concept_dir, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT, "--rank", "-1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: --rank must be a positive integer, got -1."
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Pieces: prompt encoding per family, the baselines' export


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_prompt_encoder_matches_the_pipelines_encode_prompt(kind, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pipeline(kind, tmp_path / kind))
    family = next(f for f in FAMILIES.values() if f.name == kind)
    encoders = {s: getattr(pipe, s) for s in family.text_encoders}
    prompts = [PROMPT, "a blue star on a white background"]
    with torch.no_grad():
        ours = family.prompt_encoder(pipe, encoders, 16)(prompts, torch.device("cpu"))
        if kind == "sd":
            reference = {"encoder_hidden_states": pipe.encode_prompt(prompts, "cpu", 1, False)[0]}
        elif kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            reference = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        elif kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=16)
            reference = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=16)
            reference = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("adapter", ["lora", "dora", "pissa"])
def test_baseline_export_is_the_trained_model_on_the_untouched_base(adapter, sd_pipeline, tmp_path):
    """The alpha = r export (scale baked in; PiSSA converted back to a LoRA on W) reproduces the trained encoder."""
    pipe = DiffusionPipeline.from_pretrained(sd_pipeline)
    encoder = pipe.text_encoder
    trained = make_adapter(adapter=adapter, rank=4, alpha=8.0)
    encoder.requires_grad_(False)
    trained.add_to("text_encoder", encoder)
    with torch.no_grad():  # "training": every adapter parameter moves
        for param in encoder.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    save_lora_formats(tmp_path, type(pipe), trained.lora_states({"text_encoder": encoder}), ["diffusers"])
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        trained = encoder(ids)[0]
        stock = DiffusionPipeline.from_pretrained(sd_pipeline)
        before = stock.text_encoder(ids)[0]
        stock.load_lora_weights(tmp_path, weight_name=LORA_WEIGHT_NAME)
        loaded = stock.text_encoder(ids)[0]
    assert (trained - before).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_dreambooth_end_to_end_in_a_subprocess_and_a_stock_pipeline_loads_the_export(sd_pipeline, concept_dir,
                                                                                       tmp_path):
    out = tmp_path / "out"
    argv = tiny_args(sd_pipeline, concept_dir, out, "--instance_prompt", INSTANCE_PROMPT, "--report_to", "tensorboard",
                     "--validation_prompt", INSTANCE_PROMPT, "--max_train_steps", "3", "--learning_rate", "5e-2")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Steps: 100%" in proc.stderr  # the tqdm bar
    for name in (LORA_WEIGHT_NAME, NATIVE_WEIGHT_NAME, "README.md", PLOT_NAME, HISTORY_NAME, "image_0.png"):
        assert (out / name).is_file(), name
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / NATIVE_WEIGHT_NAME).is_file() and (checkpoint / "optimizer.bin").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    grids = sorted((out / "validation").glob("*.png"))
    assert grids and Image.open(grids[-1]).size == (2 * 16, 16)  # --num_validation_images 2 side by side
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and INSTANCE_PROMPT in card and "base_model:" in card
    records = history(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert max(r["orthonormality_error"] for r in records) < 1e-5

    images = run_stock(sd_pipeline, out, INSTANCE_PROMPT, **default_generation_kwargs("sd"))
    assert np.abs(images["loaded"] - images["base"]).max() > 1e-3, "the export must change the images"
    np.testing.assert_allclose(images["fused"], images["loaded"], atol=1e-5)
    np.testing.assert_array_equal(images["unloaded"], images["base"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_captioned_training_on_dit_pipelines_and_a_stock_pipeline_loads_the_export(kind, style_dir, tmp_path):
    pipeline = build_tiny_pipeline(kind, tmp_path / kind)
    out = tmp_path / "out"
    run(tiny_args(pipeline, style_dir, out, "--max_sequence_length", "16", "--max_train_steps", "2",
                  "--learning_rate", "5e-2", "--checkpointing_steps", "100", "--weighting_scheme", "logit_normal"))
    assert [r["step"] for r in history(out)] == [1, 2]
    exported = load_file(out / LORA_WEIGHT_NAME)
    assert exported and all(key.startswith("transformer.") for key in exported)
    images = run_stock(pipeline, out, PROMPT, **default_generation_kwargs(kind))
    assert np.abs(images["loaded"] - images["base"]).max() > 1e-3


@pytest.mark.parametrize("adapter", ["stella", "pissa"])
def test_resume_gives_the_same_losses_and_factors_as_a_straight_run(adapter, sd_pipeline, concept_dir, tmp_path):
    # batch 1 over 3 images: step 2 is mid-epoch, so the resume skips batches and crosses an epoch boundary;
    # warm-up over 3 steps makes the restored scheduler state matter, random flips the per-epoch augmentation;
    # PiSSA (peft's state dict, a base weight changed at init) with the text encoder too
    common = ["--instance_prompt", INSTANCE_PROMPT, "--train_batch_size", "1", "--random_flip", "--no-center_crop",
              "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--learning_rate", "5e-2",
              "--adapter", adapter, *(["--train_text_encoder"] if adapter == "pissa" else [])]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run(tiny_args(sd_pipeline, concept_dir, straight, *common, "--max_train_steps", "4"))
    run(tiny_args(sd_pipeline, concept_dir, halves, *common, "--max_train_steps", "2"))
    run(tiny_args(sd_pipeline, concept_dir, halves, *common, "--max_train_steps", "4",
                  "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"))
    assert [p.name for p in halves.glob("checkpoint-*")] == ["checkpoint-4"]
    assert [r["loss"] for r in history(halves)] == [r["loss"] for r in history(straight)]
    assert len({r["loss"] for r in history(straight)}) == 4
    factors = NATIVE_WEIGHT_NAME if adapter == "stella" else PEFT_WEIGHT_NAME
    ours, reference = load_file(halves / factors), load_file(straight / factors)
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0)


def test_prior_preservation_generates_missing_class_images(sd_pipeline, concept_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (16, 16), "white").save(class_dir / "given.png")
    out = tmp_path / "out"
    run(tiny_args(sd_pipeline, concept_dir, out, "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation",
                  "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a shape",
                  "--num_class_images", "3", "--max_train_steps", "2",
                  # the UNet loss options on the way: v-prediction, min-SNR weighting, noise offset
                  "--prediction_type", "v_prediction", "--snr_gamma", "5", "--noise_offset", "0.05"))
    assert len(list(class_dir.glob("*.png"))) == 3  # two generated with the base model
    assert all(math.isfinite(r["loss"]) for r in history(out))
    assert (out / LORA_WEIGHT_NAME).is_file()


@pytest.mark.parametrize("adapter", ["stella", "lora", "dora", "pissa"])
def test_each_adapter_trains_unet_and_text_encoders(adapter, sdxl_pipeline, style_dir, tmp_path):
    """SDXL (two CLIP encoders) with --train_text_encoder; the export loads into a fresh pipeline."""
    out = tmp_path / "out"
    run(tiny_args(sdxl_pipeline, style_dir, out, "--adapter", adapter, "--train_text_encoder",
                  "--max_train_steps", "2", "--checkpointing_steps", "2"))
    settings = read_saved_settings(out / "checkpoint-2")
    assert settings["adapter"] == adapter and settings["train_text_encoder"] is True
    prefixes = {key.split(".", 1)[0] for key in load_file(out / LORA_WEIGHT_NAME)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    records = history(out)
    assert all((r["orthonormality_error"] is None) == (adapter != "stella") for r in records)
    pipe = DiffusionPipeline.from_pretrained(sdxl_pipeline)
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(sd_pipeline, style_dir, tmp_path, monkeypatch):
    script = train_script()
    real = script.prior_preservation_loss
    calls = []

    def nan_from_the_third_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(script, "prior_preservation_loss", nan_from_the_third_step)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; .* last good checkpoint is .*checkpoint-2"):
        run(tiny_args(sd_pipeline, style_dir, out, "--max_train_steps", "4"))
    assert (out / "checkpoint-2" / NATIVE_WEIGHT_NAME).is_file()
    assert not (out / "checkpoint-4").exists() and not (out / LORA_WEIGHT_NAME).exists()
    assert [r["step"] for r in history(out)] == [1, 2]
