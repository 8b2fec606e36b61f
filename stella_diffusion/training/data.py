"""Training data: DreamBooth folders (one prompt) and captioned image folders (``metadata.jsonl``), validated up
front, served in an order and with augmentations that depend only on seeds (so a resumed run sees what a straight
run sees, on every process).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from diffusers import DiffusionPipeline
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from ..files import METADATA_FILE, UnreadableImageWarning, is_readable_image, read_jsonl, to_rgb
from .config import TrainingError


@dataclass(frozen=True)
class ImageRecord:
    """One training image and the prompt it is trained with."""

    path: Path
    prompt: str


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


def captioned_records(folder: str | Path, caption_column: str = "text") -> list[ImageRecord]:
    """The images of a diffusers ``imagefolder`` with their captions from ``metadata.jsonl``.

    Rows name their image in ``file_name`` (relative to the folder) and the caption in ``caption_column``;
    rows whose file is missing or not an image are skipped with a warning.
    """
    folder = _check_folder(folder, "--instance_data_dir")
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise TrainingError(f"--instance_data_dir {folder} has no {METADATA_FILE} (needed for --caption_column).")
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
        raise TrainingError(f"--instance_data_dir {folder}: no readable image is listed in {METADATA_FILE}.")
    return records


def is_captioned(args: argparse.Namespace) -> bool:
    """Captioned fine-tuning: ``--caption_column`` given, or no ``--instance_prompt`` and a ``metadata.jsonl``."""
    if args.caption_column is not None:
        return True
    return args.instance_prompt is None and (Path(args.instance_data_dir) / METADATA_FILE).is_file()


def training_records(args: argparse.Namespace) -> list[ImageRecord]:
    """The instance images of either data mode, validated (see `folder_images` / `captioned_records`)."""
    _check_folder(args.instance_data_dir, "--instance_data_dir")
    if is_captioned(args):
        return captioned_records(args.instance_data_dir, args.caption_column or "text")
    if args.instance_prompt is None:
        raise TrainingError(
            "--instance_prompt is required for DreamBooth training (or give a captioned folder: a metadata.jsonl "
            "with --caption_column)."
        )
    return dreambooth_records(args.instance_data_dir, args.instance_prompt)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from several integers (run seed, epoch, step, rank ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation) with their prompts, as diffusers' dataset does.

    Images are resized (shorter side = ``size``), optionally flipped and cropped. The random crop and flip of an
    item depend only on (seed, epoch, index), so a resumed run sees exactly the images a straight run sees.
    Items also carry the original size and crop corner, which SDXL conditions on.
    """

    def __init__(
        self,
        instance: Sequence[ImageRecord],
        class_records: Sequence[ImageRecord] | None = None,
        size: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.instance = list(instance)
        self.class_records = list(class_records) if class_records else []
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_records))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, record: ImageRecord, generator: torch.Generator) -> dict[str, Any]:
        with Image.open(record.path) as image:
            image = to_rgb(ImageOps.exif_transpose(image))
        original_size = (image.height, image.width)
        scale = self.size / min(image.size)
        width, height = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = TF.resize(image, [height, width], interpolation=TF.InterpolationMode.BILINEAR)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            image = TF.horizontal_flip(image)
        if self.center_crop:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        else:
            top = int(torch.randint(0, height - self.size + 1, (), generator=generator))
            left = int(torch.randint(0, width - self.size + 1, (), generator=generator))
        image = TF.crop(image, top, left, self.size, self.size)
        pixels = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=False) / 127.5 - 1.0
        return {"pixel_values": pixels, "prompt": record.prompt, "original_size": original_size,
                "crop_top_left": (top, left)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        example = {"instance": self._load(self.instance[index % len(self.instance)], generator)}
        if self.class_records:
            example["class"] = self._load(self.class_records[index % len(self.class_records)], generator)
        return example


def collate_fn(examples: Sequence[dict[str, Any]], with_prior_preservation: bool = False) -> dict[str, Any]:
    """One batch; with prior preservation the class images follow the instance images (one forward pass)."""
    items = [e["instance"] for e in examples]
    if with_prior_preservation:
        items += [e["class"] for e in examples]
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]).contiguous(),
        "prompts": [i["prompt"] for i in items],
        "original_sizes": [i["original_size"] for i in items],
        "crop_top_lefts": [i["crop_top_left"] for i in items],
    }


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): identical on every process and after a resume."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def generate_class_images(
    model: str,
    class_dir: str | Path,
    class_prompt: str,
    num_images: int,
    *,
    accelerator: Any,
    batch_size: int,
    seed: int,
    torch_dtype: torch.dtype,
    load_kwargs: Mapping[str, Any],
    generation_kwargs: Mapping[str, Any],
) -> None:
    """Fill ``class_dir`` up to ``num_images`` readable images with the base model, as diffusers' script does.

    Image ``i`` uses its own generator seeded from ``(seed, i)``; the work is split over the processes.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    present = [p for p in sorted(class_dir.iterdir()) if p.is_file() and is_readable_image(p)]
    missing = num_images - len(present)
    if missing <= 0:
        return
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, **load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    indices = list(range(len(present), num_images))
    with accelerator.split_between_processes(indices) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            generators = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in chunk]
            images = pipe([class_prompt] * len(chunk), generator=generators, **generation_kwargs).images
            for i, image in zip(chunk, images, strict=True):
                image.save(class_dir / f"class-{i:05d}.png")
    accelerator.wait_for_everyone()
    del pipe
