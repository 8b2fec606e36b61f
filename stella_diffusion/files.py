"""Reading what users hand in: image folders (listed by extension, decoded to 8-bit RGB), JSONL and prompt files.

Training, evaluation and the shapes demo all read these the same way, so the helpers live below all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

METADATA_FILE = "metadata.jsonl"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by extension), sorted so runs are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"Image folder {folder} does not exist.")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit grey is scaled (PIL would clip), transparency goes over white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 1 / 257  # float images are taken as [0, 1]
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"No prompts in {path}.")
    return prompts


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a ``.jsonl`` file with their line numbers (from 1); blank lines are skipped.

    A file that is not UTF-8 (a byte-order mark is accepted) or a line that is not a JSON object raises
    ``ValueError`` naming the file (and the line), so a caller can say which row of a hand-edited
    ``metadata.jsonl`` is broken.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}).") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
        rows.append((number, row))
    return rows


def is_readable_image(path: str | Path) -> bool:
    """Whether ``path`` decodes whole as an image: `Image.verify` alone passes a truncated JPEG, and a
    decompression bomb (PIL's ``DecompressionBombError``) counts as unreadable, so both are caught up front."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` only if the block completes.

    A kill or an error part-way leaves the previous file (or no file) in place, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path.write_text(text)`` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
