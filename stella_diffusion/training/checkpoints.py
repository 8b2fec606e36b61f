"""Checkpoints of a training run: atomic ``checkpoint-{step}`` folders, the resume path, rotation, the guards that
stop a diverging run, and the per-step history that travels inside every checkpoint (as JSON: nothing a user can
hand in is ever unpickled).

A checkpoint is written under a temporary name, completed by a marker file written last, and only then renamed
to ``checkpoint-{step}``; older checkpoints are pruned after that. A kill at any point leaves every earlier
checkpoint intact, and ``latest`` is the newest complete one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..files import write_text_atomic
from .adapters import Adapter, read_saved_settings
from .config import TrainingError

logger = get_logger(__name__)
MARKER_NAME = "checkpoint_complete.json"  # written last: a checkpoint without it is torn
HISTORY_NAME = "training_history.json"
# accelerate's own files, which it loads with torch.load(weights_only=True); anything else ending in .pkl is foreign
_ACCELERATE_PICKLES = re.compile(r"random_states_\d+\.pkl")


def checkpoint_step(path: str | Path) -> int:
    """The global step of a ``checkpoint-{step}`` folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise TrainingError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500).")
    return int(match.group(1))


def read_marker(checkpoint: str | Path) -> dict[str, Any] | None:
    """The completion record of a checkpoint (``None`` for a torn one)."""
    try:
        return json.loads(Path(checkpoint, MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_checkpoints(output_dir: str | Path, *, warn_torn: bool = False) -> list[Path]:
    """The complete ``checkpoint-{step}`` folders of ``output_dir``, oldest first (torn ones skipped)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = sorted((p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=checkpoint_step)
    complete = [p for p in found if read_marker(p) is not None]
    if warn_torn:
        for torn in sorted(set(found) - set(complete), key=checkpoint_step):
            warnings.warn(f"Skipping {torn}: an incomplete checkpoint (no {MARKER_NAME}).", stacklevel=2)
    return complete


def last_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose loss was finite and whose factors were finite and orthonormal."""
    good = [p for p in list_checkpoints(output_dir) if read_marker(p).get("healthy", False)]
    return good[-1] if good else None


def resolve_checkpoint(output_dir: str | Path, value: str | None) -> Path | None:
    """``--resume_from_checkpoint``: ``latest`` (None when there is none yet), a path, or a name in ``output_dir``.

    ``latest`` is the newest complete checkpoint; a named one must be complete and hold no foreign pickle.
    """
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir, warn_torn=True)
        chosen = found[-1] if found else None
    else:
        candidates = [c for c in (Path(value), Path(output_dir) / value) if c.is_dir()]
        if not candidates:
            raise TrainingError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
        chosen = candidates[0]
        checkpoint_step(chosen)
        if read_marker(chosen) is None:
            raise TrainingError(f"--resume_from_checkpoint {chosen} is incomplete (no {MARKER_NAME}: the run was "
                                "stopped while saving it); resume from an earlier one or from 'latest'.")
    if chosen is not None:
        foreign = sorted(p.name for p in chosen.glob("*.pkl") if not _ACCELERATE_PICKLES.fullmatch(p.name))
        if foreign:
            raise TrainingError(f"--resume_from_checkpoint {chosen} holds {', '.join(foreign)}, which this script "
                                "never writes; refusing to unpickle it (pickle files can run code).")
    return chosen


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


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    save_state: Callable[[str], None],
    record: Mapping[str, Any],
    *,
    healthy: bool,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically, then prune to ``total_limit`` complete checkpoints.

    Args:
        output_dir: the run's folder.
        step: the global step the checkpoint holds.
        save_state: writes the state into the folder it is given (``accelerator.save_state``).
        record: the step's history record, kept in the completion marker.
        healthy: whether the loss and the factors were finite (and U, V orthonormal) at this step.
        total_limit: how many complete checkpoints to keep (``None``: all).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_state(str(partial))
    write_text_atomic(partial / MARKER_NAME, json.dumps({**record, "step": step, "healthy": healthy}) + "\n")
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it
        stale = output_dir / f".checkpoint-{step}.replaced"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale)
    else:
        os.replace(partial, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[: -total_limit or None]:
            # renamed out of the checkpoint-N names first: a kill mid-removal leaves a leftover, never a checkpoint
            # with its marker but without its weights
            doomed = output_dir / f".{old.name}.partial"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    for leftover in output_dir.glob(".checkpoint-*.partial"):  # from runs killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def save_checkpoint_on_main(accelerator: Accelerator, output_dir: str | Path, step: int, record: Mapping[str, Any],
                            *, healthy: bool, total_limit: int | None) -> None:
    """`save_checkpoint` through ``accelerator.save_state`` on the main process; every process waits for it."""
    if accelerator.is_main_process:
        path = save_checkpoint(output_dir, step, accelerator.save_state, record, healthy=healthy,
                               total_limit=total_limit)
        logger.info(f"Saved {path}" + ("" if healthy else " (not healthy: a resume will not pick it as good)"))
    accelerator.wait_for_everyone()


def is_healthy(record: Mapping[str, Any], params: Sequence[torch.Tensor], max_orthonormality_error: float) -> bool:
    """Whether a step's state is one to resume from: finite loss and parameters, U and V on the manifold."""
    error = record.get("orthonormality_error")
    on_manifold = error is None or error <= max_orthonormality_error  # False for NaN too
    return math.isfinite(record["loss"]) and on_manifold and all(bool(p.isfinite().all()) for p in params)


def check_divergence(record: Mapping[str, Any], skipped_in_a_row: int, max_skipped_steps: int,
                     max_orthonormality_error: float, output_dir: str | Path) -> None:
    """Stop a run that diverged: too many skipped steps in a row, or U / V off the manifold after a step."""
    step = record["step"]
    if skipped_in_a_row > max_skipped_steps:
        raise TrainingError(f"{skipped_in_a_row} optimizer steps in a row were skipped for non-finite gradients "
                            f"(up to step {step}; --max_skipped_steps {max_skipped_steps}): the run diverged "
                            f"(lower --learning_rate?); training stopped, {stop_message(output_dir)}.")
    error = record.get("orthonormality_error")
    if error is not None and not error <= max_orthonormality_error:
        raise TrainingError(f"max|UᵀU − I| = {error:.3g} after step {step} (--max_orthonormality_error "
                            f"{max_orthonormality_error:g}): U and V left the manifold; training stopped, "
                            f"{stop_message(output_dir)}.")


def stop_message(output_dir: str | Path) -> str:
    """The end of a stop message: the newest checkpoint a resume can safely start from."""
    good = last_good_checkpoint(output_dir)
    return f"the last good checkpoint is {good}" if good else "no good checkpoint had been saved yet"


def check_finite_loss(loss: float, step: int, output_dir: str | Path) -> None:
    """Stop the run when the loss is NaN / inf; the checkpoints already saved are left as they are."""
    if not math.isfinite(loss):
        raise TrainingError(f"The loss became {loss} at step {step}; training stopped, {stop_message(output_dir)}.")


class TrainingHistory:
    """Loss, learning rate, skipped steps and ``max|UᵀU − I|`` per optimizer step; saved in every checkpoint."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, **record: Any) -> None:
        self.records.append(record)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.records, indent=1) + "\n")

    def load(self, path: str | Path) -> None:
        """Read what `save` wrote (JSON only)."""
        path = Path(path)
        self.records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
