"""What a run trains on: DreamBooth folders (one prompt), captioned image folders (``metadata.jsonl``) and
``datasets`` sources, each checked up front (one `TrainingError` line for bad input), the held-out validation split,
and the seeds everything random is derived from (so a resumed run draws what a straight run draws).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..files import METADATA_FILE, UnreadableImageWarning, is_readable_image, read_jsonl, to_rgb
from .config import TrainingError


@dataclass(frozen=True)
class ImageRecord:
    """One training image file and the prompt it is trained with."""

    path: Path
    prompt: str

    def open(self) -> Image.Image:
        """The image, upright (EXIF orientation applied) and in 8-bit RGB."""
        with Image.open(self.path) as image:
            return to_rgb(ImageOps.exif_transpose(image))

    def size(self) -> tuple[int, int]:
        """(height, width) of the upright image, read from the header only."""
        with Image.open(self.path) as image:
            return upright_size(image)

    def identity(self) -> str:
        """What a cache entry of this image is keyed by: the file and its size and modification time."""
        stat = self.path.stat()
        return f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True, eq=False)
class DatasetRecord:
    """One row of a `datasets.Dataset` (``--dataset_name``) and its prompt."""

    dataset: Any
    row: int
    image_column: str
    prompt: str

    def open(self) -> Image.Image:
        return to_rgb(ImageOps.exif_transpose(self.dataset[self.row][self.image_column]))

    def size(self) -> tuple[int, int]:
        return upright_size(self.dataset[self.row][self.image_column])

    def identity(self) -> str:
        return f"{self.dataset._fingerprint}:{self.row}"  # datasets' content hash of the loaded table


Record = ImageRecord | DatasetRecord
_EXIF_ORIENTATION = 0x0112


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of ``image`` once its EXIF orientation is applied, without decoding its pixels."""
    width, height = image.size
    return (width, height) if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8) else (height, width)


def _warn_skipped(path: Path) -> None:
    warnings.warn(f"Skipping {path}: not a readable image.", UnreadableImageWarning, stacklevel=3)


def _check_folder(folder: str | Path, flag: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"{flag} {folder}: no such folder.")
    if not any(folder.iterdir()):
        raise TrainingError(f"{flag} {folder} is empty.")
    return folder


def folder_images(folder: str | Path, flag: str = "--instance_data_dir") -> list[Path]:
    """The readable images directly in ``folder``, sorted; other files are skipped with a warning naming them.

    A missing or empty folder, or one without a single readable image, is a `TrainingError`.
    """
    folder = _check_folder(folder, flag)
    images = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != METADATA_FILE):
        if is_readable_image(path):
            images.append(path)
        else:
            _warn_skipped(path)
    if not images:
        raise TrainingError(f"{flag} {folder} holds no readable image.")
    return images


def dreambooth_records(folder: str | Path, prompt: str, flag: str = "--instance_data_dir") -> list[ImageRecord]:
    """Every image of a DreamBooth folder with the one instance (or class) prompt."""
    return [ImageRecord(path, prompt) for path in folder_images(folder, flag)]


def captioned_records(folder: str | Path, caption_column: str = "text", flag: str = "--instance_data_dir"
                      ) -> list[ImageRecord]:
    """The images of a diffusers ``imagefolder`` with their captions from ``metadata.jsonl``.

    Rows name their image in ``file_name`` (relative to the folder) and the caption in ``caption_column``;
    rows whose file is missing or not an image are skipped with a warning.
    """
    folder = _check_folder(folder, flag)
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise TrainingError(f"{flag} {folder} has no {METADATA_FILE} (needed for --caption_column).")
    try:
        rows = read_jsonl(metadata)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    records = []
    for number, row in rows:
        if "file_name" not in row or caption_column not in row:
            raise TrainingError(
                f"{metadata} line {number} needs 'file_name' and the caption column {caption_column!r}; "
                f"it has {sorted(row)}."
            )
        name, caption = row["file_name"], row[caption_column]
        if not isinstance(name, str) or not name.strip():
            raise TrainingError(f"{metadata} line {number}: 'file_name' must be a file name, got {name!r}.")
        if not isinstance(caption, str) or not caption.strip():
            raise TrainingError(f"{metadata} line {number}: the caption ({caption_column!r}) must be a non-empty "
                                f"string, got {caption!r}.")
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise TrainingError(f"{metadata} line {number}: 'file_name' {name!r} points outside {folder}.")
        if path.is_file() and is_readable_image(path):
            records.append(ImageRecord(path, caption))
        else:
            _warn_skipped(path)
    if not records:
        raise TrainingError(f"{flag} {folder}: no readable image is listed in {METADATA_FILE}.")
    return records


def is_captioned(args: argparse.Namespace) -> bool:
    """Captioned fine-tuning: ``--caption_column`` given, or no ``--instance_prompt`` and captions to read (a
    ``metadata.jsonl`` in the folder, or any ``--dataset_name``)."""
    if args.caption_column is not None:
        return True
    if args.instance_prompt is not None:
        return False
    return args.dataset_name is not None or (Path(args.instance_data_dir) / METADATA_FILE).is_file()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def dataset_records(args: argparse.Namespace) -> list[DatasetRecord]:
    """The rows of ``--dataset_name`` (a hub dataset or a local folder ``datasets.load_dataset`` reads, e.g. an
    imagefolder), with captions from ``--caption_column`` or the one ``--instance_prompt``."""
    import datasets  # only here: it pulls in pyarrow, slow to import for runs that read folders

    try:
        table = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    except Exception as err:  # hub, file and format errors come in many classes
        raise TrainingError(f"--dataset_name {args.dataset_name}: cannot load it ({_first_line(err)}).") from err
    captioned = is_captioned(args)
    column = args.caption_column or "text"
    wanted = [("--image_column", args.image_column)] + ([("--caption_column", column)] if captioned else [])
    for flag, name in wanted:
        if name not in table.column_names:
            raise TrainingError(f"--dataset_name {args.dataset_name} has no column {name!r} ({flag}); its columns: "
                                f"{', '.join(table.column_names)}.")
    prompts = table[column] if captioned else [args.instance_prompt] * len(table)
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TrainingError(f"--dataset_name {args.dataset_name} row {row}: the caption ({column!r}) must be a "
                                f"non-empty string, got {prompt!r}.")
    if not len(table):
        raise TrainingError(f"--dataset_name {args.dataset_name} has no rows.")
    return [DatasetRecord(table, row, args.image_column, prompt) for row, prompt in enumerate(prompts)]


def folder_records(folder: str | Path, args: argparse.Namespace, flag: str = "--instance_data_dir"
                   ) -> list[ImageRecord]:
    """The images of a folder in the run's data mode (captions from ``metadata.jsonl``, or the instance prompt).

    A captioned folder next to ``--instance_prompt`` (without ``--caption_column``) is refused: silently training
    on one prompt while captions sit next to the images is the surprise this prevents.
    """
    has_metadata = (_check_folder(folder, flag) / METADATA_FILE).is_file()
    if args.caption_column is not None or (args.instance_prompt is None and has_metadata):
        return captioned_records(folder, args.caption_column or "text", flag)
    if args.instance_prompt is None:
        raise TrainingError(
            "--instance_prompt is required for DreamBooth training (or give a captioned folder: a metadata.jsonl "
            "with --caption_column)."
        )
    if has_metadata:
        raise TrainingError(f"{flag} {folder} has a {METADATA_FILE} (captions) and --instance_prompt is given: "
                            f"pass --caption_column to use the captions or remove {METADATA_FILE}.")
    return dreambooth_records(folder, args.instance_prompt, flag)


def training_records(args: argparse.Namespace) -> list[Record]:
    """The instance images of the run's data source, validated (see `folder_records` / `dataset_records`)."""
    if args.dataset_name is not None:
        return dataset_records(args)
    return folder_records(args.instance_data_dir, args)


def split_validation(records: Sequence[Record], args: argparse.Namespace) -> tuple[list[Record], list[Record]]:
    """(training, validation) records for ``--validation_split``: a folder read like the training data, or a
    fraction of the training records held out (chosen from the seed; at least one on each side)."""
    split = args.validation_split
    if split is None:
        return list(records), []
    if Path(split).is_dir():
        return list(records), list(folder_records(split, args, "--validation_split"))
    try:
        fraction = float(split)
    except ValueError:
        raise TrainingError(f"--validation_split {split!r}: neither a folder nor a fraction in (0, 1).") from None
    if not 0.0 < fraction < 1.0:
        raise TrainingError(f"--validation_split must be a fraction in (0, 1) or a folder, got {split}.")
    held = min(len(records) - 1, max(1, round(fraction * len(records))))
    if held < 1:
        raise TrainingError("--validation_split needs at least two training images to hold one out.")
    generator = torch.Generator().manual_seed(derived_seed(args.seed, VALIDATION_SEED_KEY))
    chosen = set(torch.randperm(len(records), generator=generator)[:held].tolist())
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


# seeds the validation split and the validation loss's noise apart from anything training draws
VALIDATION_SEED_KEY = 0x7A11D


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from several integers (run seed, epoch, step, rank ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)
