"""Runs train_dreambooth_stella.py and SIGKILLs the process at one point of the save of ``checkpoint-{STEP}``.

    python tests/_kill_during_save.py POINT STEP SCRIPT_ARGS...

POINT is where the kill lands (tests/test_train_reliability.py checks that a resume from ``latest`` then
continues exactly as a straight run):

- ``after_save_state``: ``accelerator.save_state`` has written the temporary folder, no marker yet;
- ``before_rename``: the completion marker is written, the folder not yet renamed to ``checkpoint-{STEP}``;
- ``during_prune``: ``checkpoint-{STEP}`` is complete and an older checkpoint is being removed (its adapter file
  is already gone).

SIGKILL, not an exception: nothing (no ``finally``, no atexit) runs after it, as with the OOM killer or a
pre-empted machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from stella_diffusion.integrations.diffusers import NATIVE_WEIGHT_NAME
from stella_diffusion.training import checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fixtures import train_script  # noqa: E402  (a script, not a package module)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    """Patch the one function after which ``point`` is reached during the save of ``checkpoint-{step}``."""
    partial = f".checkpoint-{step}.partial"
    if point == "after_save_state":
        real_save_state = Accelerator.save_state

        def save_state(self: Accelerator, output_dir: str | None = None, **kwargs: object) -> object:
            result = real_save_state(self, output_dir, **kwargs)
            if Path(output_dir).name == partial:
                die()
            return result

        Accelerator.save_state = save_state
    elif point == "before_rename":
        real_write = checkpoints.write_text_atomic

        def write_text_atomic(path: str | Path, text: str) -> Path:
            written = real_write(path, text)
            if Path(path).name == checkpoints.MARKER_NAME and Path(path).parent.name == partial:
                die()
            return written

        checkpoints.write_text_atomic = write_text_atomic
    elif point == "during_prune":
        real_rmtree = shutil.rmtree

        def rmtree(path: str | Path, *args: object, **kwargs: object) -> None:
            path = Path(path)
            found = re.search(r"checkpoint-(\d+)", path.name)
            pruning = (found and int(found.group(1)) < step and path.is_dir()
                       and (path.parent / f"checkpoint-{step}").is_dir())
            if pruning:
                (path / NATIVE_WEIGHT_NAME).unlink()  # rmtree has made some progress
                die()
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, step, *argv = sys.argv[1:]
    arm(point, int(step))
    script = train_script()
    script.main(script.parse_args(argv))
    raise SystemExit(f"the run finished: the save of checkpoint-{step} never reached {point}")
