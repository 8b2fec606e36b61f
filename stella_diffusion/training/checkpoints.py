"""Checkpoints of a training run: ``checkpoint-{step}`` folders, the resume path, rotation, the NaN guard, and the
per-step history that travels inside every checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .adapters import Adapter, read_saved_settings
from .config import TrainingError


def checkpoint_step(path: str | Path) -> int:
    """The global step of a ``checkpoint-{step}`` folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise TrainingError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500).")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-{step}`` folders of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | Path, value: str | None) -> Path | None:
    """``--resume_from_checkpoint``: ``latest`` (None when there is none yet), a path, or a name in ``output_dir``."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(value), Path(output_dir) / value):
        if candidate.is_dir():
            checkpoint_step(candidate)
            return candidate
    raise TrainingError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")


def check_resume_compatible(checkpoint: Path, adapter: Adapter) -> None:
    """Refuse a checkpoint whose adapter configuration differs from the requested one, naming each difference."""
    saved = read_saved_settings(checkpoint)
    if saved is None:
        raise TrainingError(f"--resume_from_checkpoint {checkpoint}: no adapter file, not a checkpoint of this "
                            "script.")
    wanted = adapter.resume_settings()
    differences = [f"{key} {saved.get(key)!r} (checkpoint) vs {wanted.get(key)!r} (requested)"
                   for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
    if differences:
        raise TrainingError(f"--resume_from_checkpoint {checkpoint} has a different adapter configuration: "
                            f"{'; '.join(differences)}.")


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Before saving a new checkpoint, remove the oldest so that at most ``total_limit`` remain afterwards."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit + 1)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def check_finite_loss(loss: float, step: int, output_dir: str | Path) -> None:
    """Stop the run when the loss is NaN / inf; the checkpoints already saved are left as they are."""
    if math.isfinite(loss):
        return
    found = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been saved yet"
    raise TrainingError(f"The loss became {loss} at step {step}; training stopped, {kept}.")


class TrainingHistory:
    """Loss, learning rate and ``max|UᵀU − I|`` per optimizer step; saved inside every checkpoint."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, **record: Any) -> None:
        self.records.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = list(state["records"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.records, indent=1) + "\n")
