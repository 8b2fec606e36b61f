"""The embedded demo: its committed data, its config, and a short run that must beat the base model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from stella_diffusion.training.outputs import EVAL_DIR

from ._train_fixtures import REPO, train_script

DEMO_CONFIG = REPO / "configs" / "tiny-demo.yaml"
DEMO_DATA = REPO / "data" / "tiny-demo"


def test_committed_demo_data_is_what_the_script_writes(tmp_path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--output_dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in DEMO_DATA.iterdir() if p.is_dir())
    files = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert files == sorted(p.name for p in DEMO_DATA.iterdir() if p.is_file())
    for name in files:
        assert (tmp_path / name).read_text() == (DEMO_DATA / name).read_text()
    for folder in folders:
        fresh, committed = tmp_path / folder, DEMO_DATA / folder
        assert (fresh / "metadata.jsonl").read_text() == (committed / "metadata.jsonl").read_text()
        names = sorted(p.name for p in fresh.glob("*.png"))
        assert names == sorted(p.name for p in committed.glob("*.png"))
        for name in names:  # pixels, not bytes: PNG encoders of other Pillow versions may differ
            assert np.array_equal(np.asarray(Image.open(fresh / name)), np.asarray(Image.open(committed / name)))


def test_demo_config_needs_no_other_flags_and_its_paths_exist() -> None:
    args = train_script().parse_args(["--config", str(DEMO_CONFIG)])
    for path in (args.pretrained_model_name_or_path, args.instance_data_dir, args.eval_reference_dir,
                 args.eval_prompts, args.eval_drift_prompts):
        assert (REPO / path).exists(), path
    assert args.adapter == "stella" and args.eval_feature_extractor == "domain"
    rows = [json.loads(line) for line in (REPO / args.instance_data_dir / "metadata.jsonl").read_text().splitlines()]
    assert {row["shape"] for row in rows} == {"star"} and all("sks shape" in row["text"] for row in rows)


@pytest.mark.slow
def test_short_demo_run_beats_the_base_model_on_the_held_out_concept(tmp_path, monkeypatch) -> None:
    """Issue 6: after a short demo fine-tune, FID to the held-out stars falls clearly below the base's."""
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository, as in the README
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script = train_script()
        script.main(script.parse_args([
            "--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path), "--max_train_steps", "300",
            "--num_eval_images", "64", "--num_validation_images", "4", "--validation_epochs", "1000",
            "--checkpointing_steps", "1000", "--report_to", "none",
        ]))
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / EVAL_DIR / "report.json").read_text())
    runs = {run["name"]: run for run in report["runs"]}
    assert set(runs) == {"base", "stella"}
    assert runs["base"]["num_generated"] == runs["stella"]["num_generated"] == 64
    assert runs["stella"]["fid"] < 0.6 * runs["base"]["fid"], (runs["stella"]["fid"], runs["base"]["fid"])
    # the base never saw a star; the fine-tune draws some, and keeps the prompted colours
    assert runs["base"]["accuracy"]["shape"] <= 0.05
    assert runs["stella"]["accuracy"]["shape"] >= runs["base"]["accuracy"]["shape"] + 0.2
    assert runs["stella"]["accuracy"]["colour"] >= 0.8
    assert len(list((tmp_path / EVAL_DIR / "stella").glob("*.png"))) == 64
    assert 0 < runs["stella"]["drift"] < 1 and "drift" not in runs["base"]  # the base-domain prompts moved a bit
    assert (tmp_path / EVAL_DIR / "report.png").stat().st_size > 0
    assert list((tmp_path / "validation").glob("test-step-*.png"))
    assert "## Evaluation: " in (tmp_path / "README.md").read_text()
