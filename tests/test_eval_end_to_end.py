"""End to end through the command-line programs on tiny pipelines: generate (UNet base, UNet with the LoRA
export of a StelLA adapter, a DiT) → FID / KID with a custom feature extractor, reference statistics saved
then reused → report files."""

import importlib.util
import json
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from PIL import Image

from stella_diffusion.integrations.diffusers import add_stella_adapter
from stella_diffusion.integrations.lora_formats import save_lora_export
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
        ["--pipeline", str(pipeline), "--prompts", str(prompts), "--output", str(out), "--device", "cpu"]
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
        + ["--save_stats", stats, "--name", "base", "--output", str(runs / "base.json")]
    )
    stella_result = fid(
        ["--generated", str(tmp_path / "gen_stella"), "--reference", stats, *common]
        + ["--name", "stella", "--output", str(runs / "stella.json")]
    )
    reused = fid(["--generated", str(tmp_path / "gen_base"), "--reference", stats, *common])
    assert reused["fid"] == pytest.approx(base_result["fid"], rel=1e-12)
    assert base_result["num_generated"] == stella_result["num_reference"] == 4
    assert base_result["fid"] > 0 and stella_result["fid"] != base_result["fid"]
    assert stella_result["convention"]["feature_extractor"] == "e2e_features:Features"

    _cli("report")(
        [str(runs / "base.json"), f"StelLA={runs / 'stella.json'}", "--output", str(tmp_path / "report")]
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
