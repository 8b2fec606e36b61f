"""End to end through the command-line programs on tiny pipelines: generate (UNet base, UNet with the LoRA
export of a StelLA adapter, a DiT) → FID / KID with a custom feature extractor, reference statistics saved
then reused → report files; and eval/evaluate.py: every bad input is one error line, then all runs side by side."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from diffusers import DiffusionPipeline
from PIL import Image

from stella_diffusion.integrations.diffusers import add_stella_adapter
from stella_diffusion.integrations.lora_formats import save_lora_export
from stella_diffusion.shapes.domain import write_image_folder
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs

EVAL = Path(__file__).resolve().parents[1] / "eval"
FEATURES = """
import torch
from torch import nn


class Features(nn.Module):
    num_features = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, imgs):
        return nn.functional.adaptive_avg_pool2d(self.conv(imgs.float() / 255).relu(), 2).flatten(1)
"""


def _cli(name: str):
    """``main`` of ``eval/<name>.py``, run in this process (the programs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"eval_{name}", EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _generate(pipeline: Path, prompts: Path, out: Path, kind: str, *extra: str) -> list[dict]:
    _cli("generate")(
        ["--pipeline", str(pipeline), "--prompts", str(prompts), "--output_dir", str(out), "--device", "cpu"]
        + ["--pipeline_kwargs", json.dumps(default_generation_kwargs(kind)), *extra]
    )
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_generate_fid_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "e2e_features.py").write_text(FEATURES)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment line\n\na blue square\n")
    pipeline = build_tiny_pipeline("sd", tmp_path / "sd")
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    add_stella_adapter(pipe.unet, r=2, alpha=2)
    save_lora_export(tmp_path / "stella", type(pipe), {"unet": pipe.unet})

    per_prompt = ["--num_images_per_prompt", "2", "--batch_size", "4"]
    base = _generate(pipeline, prompts, tmp_path / "gen_base", "sd", *per_prompt)
    stella = _generate(
        pipeline, prompts, tmp_path / "gen_stella", "sd", *per_prompt, "--adapter", str(tmp_path / "stella")
    )
    _generate(pipeline, prompts, tmp_path / "reference", "sd", *per_prompt, "--seed", "100")
    expected = [("a red circle", 0), ("a red circle", 1), ("a blue square", 2), ("a blue square", 3)]
    assert [(r["prompt"], r["seed"]) for r in base] == expected
    assert base[0]["settings"]["adapter"] is None and stella[0]["settings"]["adapter"].endswith("stella")
    assert Image.open(tmp_path / "gen_base" / base[0]["file_name"]).size == (16, 16)
    assert (
        Image.open(tmp_path / "gen_base/000000.png").tobytes()
        != Image.open(tmp_path / "gen_stella/000000.png").tobytes()
    )

    fid, runs = _cli("fid"), tmp_path / "runs"
    common = ["--feature_extractor", "e2e_features:Features", "--image_size", "32", "--batch_size", "4"]
    common += ["--kid_subset_size", "4", "--kid_subsets", "10", "--device", "cpu"]
    stats = str(tmp_path / "reference.npz")
    base_result = fid(
        ["--generated", str(tmp_path / "gen_base"), "--reference", str(tmp_path / "reference"), *common]
        + ["--save_stats", stats, "--name", "base", "--output_dir", str(runs)]
    )
    stella_result = fid(
        ["--generated", str(tmp_path / "gen_stella"), "--reference", stats, *common]
        + ["--name", "stella", "--output_dir", str(runs)]
    )
    reused = fid(["--generated", str(tmp_path / "gen_base"), "--reference", stats, *common])
    assert reused["fid"] == pytest.approx(base_result["fid"], rel=1e-12)
    assert base_result["num_generated"] == stella_result["num_reference"] == 4
    assert base_result["fid"] > 0 and stella_result["fid"] != base_result["fid"]
    assert stella_result["convention"]["feature_extractor"] == "e2e_features:Features"

    _cli("report")(
        [str(runs / "base.json"), f"StelLA={runs / 'stella.json'}", "--output_dir", str(tmp_path / "report")]
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [run["name"] for run in report["runs"]] == ["base", "StelLA"] and report["comparable"]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| base | " in table and "| StelLA | " in table and "e2e_features:Features" in table
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_generate_with_a_dit_pipeline(tmp_path):
    pipeline = build_tiny_pipeline("sana", tmp_path / "sana")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green triangle\n")
    records = _generate(pipeline, prompts, tmp_path / "gen", "sana", "--num_images_per_prompt", "2")
    assert [r["seed"] for r in records] == [0, 1]
    assert records[0]["settings"]["pipeline_class"] == "SanaPipeline"
    assert Image.open(tmp_path / "gen" / "000001.png").size == (32, 32)


@pytest.fixture
def cli_inputs(tmp_path):
    """The smallest valid inputs of eval/evaluate.py, for checks that stop before any model is loaded."""
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    reference = tmp_path / "ref"
    reference.mkdir()
    Image.new("RGB", (8, 8)).save(reference / "0.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "not_an_adapter").mkdir()
    np.savez(tmp_path / "five.npz", mu=np.zeros(5), sigma=np.eye(5))
    return ["--pipeline", str(pipeline), "--prompts", str(prompts), "--reference", str(reference),
            "--output_dir", str(tmp_path / "out"), "--feature_extractor", "domain", "--device", "cpu"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--num_images_per_prompt", "0"], "--num_images_per_prompt must be > 0"),
    (["--batch_size", "-1"], "--batch_size must be > 0"),
    (["--kid_max_samples", "-1"], "--kid_max_samples must be ≥ 0"),
    (["--pipeline", "{tmp}/nowhere"], "not a diffusers pipeline folder"),
    (["--reference", "{tmp}/nowhere"], "--reference {tmp}/nowhere: no such folder"),
    (["--reference", "{tmp}/missing.npz"], "no such file"),
    (["--prompts", "{tmp}/empty.txt"], "No prompts"),
    (["--runs", "base", "x={tmp}/not_an_adapter"], "holds neither pytorch_lora_weights.safetensors"),
    (["--runs", "x={tmp}/nowhere"], "is not a folder"),
    (["--runs", "base", "base"], "repeated: base"),
    (["--drift_prompts", "{tmp}/prompts.txt"], "give at least one adapter run"),
    (["--subject_dir", "{tmp}/ref"], "--subject_dir needs --clip_model"),
    (["--dino_model", "domain"], "give both"),
    (["--clip_model", "{tmp}/no_clip"], "no such folder"),
    (["--clip_model", "openai/clip-vit-large-patch14", "--offline"], "not in the Hugging Face cache"),
    (["--feature_extractor", "sift"], "--feature_extractor 'sift'"),
    (["--feature_extractor", "no_such_module:f"], "No module named 'no_such_module'"),
    (["--feature_extractor", "stella_diffusion.files:nothing"], "has no 'nothing'"),
    (["--reference", "{tmp}/five.npz"], "dimension (5,) vs 128"),  # wrong feature dims: before any pipeline
    (["--pipeline_kwargs", "[1]"], "must be a JSON object"),
])
def test_evaluate_bad_inputs_give_one_error_line(cli_inputs, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    with pytest.raises(SystemExit) as info:
        _cli("evaluate")(cli_inputs + extra)
    text = str(info.value.code)
    assert text.startswith("error: ") and "\n" not in text and message.replace("{tmp}", str(tmp_path)) in text


def test_evaluate_error_exit_status_and_no_traceback(cli_inputs):
    done = subprocess.run([sys.executable, str(EVAL / "evaluate.py"), *cli_inputs, "--batch_size", "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(EVAL.parent)})
    assert done.returncode == 1 and done.stderr.strip() == "error: --batch_size must be > 0, got 0."


@pytest.mark.slow
def test_evaluate_runs_side_by_side(tmp_path):
    from tests.test_semantic_metrics import save_tiny_clip

    pipeline = build_tiny_pipeline("sd", tmp_path / "sd")
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    add_stella_adapter(pipe.unet, r=2, alpha=2)
    save_lora_export(tmp_path / "stella", type(pipe), {"unet": pipe.unet})
    reference = write_image_folder(tmp_path / "ref", 8, seed=0, split="concept")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "drift.txt").write_text("a green star\na small triangle\na big circle\n")
    kwargs = {**default_generation_kwargs("sd"), "num_inference_steps": 2}
    paths = _cli("evaluate")([
        "--pipeline", str(pipeline), "--runs", "base", f"StelLA={tmp_path / 'stella'}",
        "--prompts", str(tmp_path / "prompts.txt"), "--num_images_per_prompt", "2", "--reference", str(reference),
        "--output_dir", str(tmp_path / "report"), "--feature_extractor", "domain", "--kid_subset_size", "4",
        "--kid_subsets", "5", "--clip_model", str(save_tiny_clip(tmp_path / "clip")), "--subject_dir", str(reference),
        "--dino_model", "domain", "--drift_prompts", str(tmp_path / "drift.txt"), "--pipeline_kwargs",
        json.dumps(kwargs), "--device", "cpu",
    ])
    report = json.loads(paths["json"].read_text())
    base, stella = report["runs"]
    assert (base["name"], stella["name"]) == ("base", "StelLA") and report["comparable"]
    for run in (base, stella):
        assert run["num_generated"] == 4 and run["num_reference"] == 8 and run["num_subject"] == 8
        assert {"fid", "kid_mean", "clip_t", "cmmd", "clip_i", "dino"} <= set(run)
    assert "drift" not in base and stella["drift"] > 0 and stella["num_drift"] == 3 and "drift_fid" in stella
    table = paths["markdown"].read_text()
    assert "| KID ↓ |" in table and "KID is shown as computed (not scaled)" in table  # 128-d classifier features
    assert "CLIP-T ↑" in table and "CMMD ↓" in table and "drift ↓" in table and "shapes-classifier" in table
    assert "Counts: subject images: 8; reference images (CMMD): 8; drift pairs: 3." in table
    assert len(list((tmp_path / "report" / "images" / "StelLA").glob("*.png"))) == 4
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def _fid_bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """(arguments, expected message) per bad input of eval/fid.py."""
    images = write_image_folder(tmp_path / "images", 6, seed=0, split="pretrain")
    one = tmp_path / "one"
    one.mkdir()
    next(images.glob("*.png")).rename(one / "only.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_npz = tmp_path / "wrong.npz"
    np.savez(wrong_npz, something=np.zeros(3))
    other_dims = tmp_path / "other-dims.npz"
    np.savez(other_dims, mu=np.zeros(5), sigma=np.eye(5), num_samples=np.asarray(10))
    domain = ["--feature_extractor", "domain"]
    return {
        "empty folder": (["--generated", str(empty), "--reference", str(images), *domain], "No images"),
        "one image": (["--generated", str(one), "--reference", str(images), *domain], "at least 2 images"),
        "missing folder": (["--generated", str(tmp_path / "nowhere"), "--reference", str(images)], "no such"),
        "not statistics": (["--generated", str(images), "--reference", str(wrong_npz), *domain], "not a statistics"),
        "feature size": (["--generated", str(images), "--reference", str(other_dims), *domain], ""),
        "batch size 0": (["--generated", str(images), "--reference", str(images), "--batch_size", "0"],
                         "--batch_size must be a positive integer"),
        "KID subset 0": (["--generated", str(images), "--reference", str(images), "--kid_subset_size", "0"],
                         "--kid_subset_size must be a positive integer"),
        "unknown extractor": (["--generated", str(images), "--reference", str(images), "--feature_extractor",
                               "no_such_module:thing"], "no_such_module"),
    }


@pytest.mark.parametrize("case", ["empty folder", "one image", "missing folder", "not statistics", "feature size",
                                  "batch size 0", "KID subset 0", "unknown extractor"])
def test_fid_bad_input_is_one_error_line(case, tmp_path, capsys):
    argv, message = _fid_bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        _cli("fid")([*argv, "--device", "cpu", "--kid_subset_size", "2"] if case != "KID subset 0" else argv)
    code = exit_info.value.code
    text = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and text.startswith("error: ") and "\n" not in text.strip() and message in text, text
