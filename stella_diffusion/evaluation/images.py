"""Image folders for FID / KID: any size and mode to 8-bit RGB at one square size, streamed in batches.

Generated and reference images go through this one function, so both sets see the same conversion and
resize: FID is very sensitive to resizing (see clean-fid), and a mismatch between the two sets alone can
move it by several points. Only one batch (plus the one being read ahead) is in memory at a time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..files import IMAGE_EXTENSIONS, UnreadableImageWarning, list_images, to_rgb

RESIZE_CONVENTION = (
    "8-bit RGB (transparency over white, 16-bit scaled by 1/257), PIL bicubic resize (antialiased) "
    "straight to a square (aspect ratio not kept)"
)
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One image as a ``size×size×3`` uint8 array, by the module's single conversion and resize convention."""
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Files in the given order as a uint8 ``N×3×size×size`` batch (for paired sets; an unreadable file raises)."""
    return torch.from_numpy(np.stack([load_image(path, size) for path in paths])).permute(0, 3, 1, 2).contiguous()


def _try_load(path: Path, size: int) -> np.ndarray | Exception:
    # errors are returned, not raised, so the consuming thread names the file in its warning
    try:
        return load_image(path, size)
    except _UNREADABLE as err:
        return err


def iter_image_batches(
    folder: str | Path,
    size: int,
    batch_size: int = 50,
    num_workers: int | None = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield uint8 ``B×3×size×size`` batches of the images under ``folder``; unreadable files are skipped.

    Each skipped file raises an :class:`UnreadableImageWarning` naming it. Decoding runs in a thread pool
    (PIL releases the GIL) one batch ahead of the consumer.
    """
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}.")
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    workers = num_workers or min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), disable=not progress, unit="img", desc=Path(folder).name)
    with ThreadPoolExecutor(workers) as pool, bar:

        def submit(chunk: list[Path]) -> list[Future]:
            return [pool.submit(_try_load, path, size) for path in chunk]

        pending = submit(chunks[0])
        for index, chunk in enumerate(chunks):
            current = pending
            if index + 1 < len(chunks):
                pending = submit(chunks[index + 1])
            arrays = []
            for path, future in zip(chunk, current, strict=True):
                result = future.result()
                if isinstance(result, Exception):
                    warnings.warn(
                        f"Skipping unreadable image {path}: {result}", UnreadableImageWarning, stacklevel=2
                    )
                else:
                    arrays.append(result)
            bar.update(len(chunk))
            if arrays:
                yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
