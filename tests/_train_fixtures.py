"""Shared pieces of the training-script tests: the script as a module, tiny data folders, run arguments, runs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from stella_diffusion.shapes.domain import CONCEPT_TOKEN, write_image_folder
from stella_diffusion.training.checkpoints import HISTORY_NAME

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_stella.py"
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
PROMPT = "a red circle"


@cache
def train_script() -> ModuleType:
    """``train_dreambooth_stella.py`` imported by path, so tests call ``main(parse_args([...]))`` in-process."""
    spec = importlib.util.spec_from_file_location("train_dreambooth_stella", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dreambooth_folder(folder: Path, n: int = 3) -> Path:
    """``n`` images of the held-out concept (stars), no captions: DreamBooth with ``INSTANCE_PROMPT``."""
    write_image_folder(folder, n, seed=0, split="concept", concept_token=CONCEPT_TOKEN)
    (folder / "metadata.jsonl").unlink()
    return folder


def captioned_folder(folder: Path, n: int = 4) -> Path:
    """``n`` images of the held-out style with a ``metadata.jsonl`` (``file_name``, ``text``)."""
    return write_image_folder(folder, n, seed=0, split="style")


def tiny_args(pipeline: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """The tiny CPU preset with this test's paths; no trackers or validation unless ``extra`` asks for them."""
    return ["--config", str(TINY_CONFIG), "--pretrained_model_name_or_path", str(pipeline),
            "--instance_data_dir", str(data), "--output_dir", str(output), "--report_to", "none",
            "--validation_prompt", "", *extra]


def run(argv: list[str]) -> list[dict]:
    """Run the training script in this process; returns its per-step history (``training_history.json``)."""
    script = train_script()
    script.main(script.parse_args(argv))
    return history(Path(argv[argv.index("--output_dir") + 1]))


def history(output_dir: Path) -> list[dict]:
    """The per-step records a run wrote."""
    return json.loads((Path(output_dir) / HISTORY_NAME).read_text())


def run_launcher(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a multi-process launcher (torchrun, accelerate launch) in its own session; a run that hangs fails the
    test with its log, and is killed with all its workers so none is left behind."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} ... hung for {timeout:g} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
