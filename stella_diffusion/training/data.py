"""Training data: DreamBooth folders (one prompt) and captioned image folders (``metadata.jsonl``), validated up
front, served in an order and with augmentations that depend only on seeds (so a resumed run sees what a straight
run sees, on every process).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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


@dataclass(frozen=True)
class CaptionSettings:
    """Caption augmentation (kohya's names): dropout to the empty prompt, and shuffled comma-separated tags."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0


def augment_caption(prompt: str, settings: CaptionSettings, generator: torch.Generator) -> str:
    """The empty prompt with probability ``dropout_rate`` (so classifier-free guidance still learns the
    unconditional case), else with ``shuffle`` its comma-separated tags shuffled after the first ``keep_tokens``."""
    if settings.dropout_rate and torch.rand((), generator=generator) < settings.dropout_rate:
        return ""
    if not settings.shuffle:
        return prompt
    tags = [tag.strip() for tag in prompt.strip().split(",")]
    fixed, rest = tags[: settings.keep_tokens], tags[settings.keep_tokens :]
    return ", ".join(fixed + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])


@dataclass(frozen=True)
class Crop:
    """How one item's pixels are made from its image: resized to ``resized``, maybe flipped, cropped to ``target``
    at (``top``, ``left``); all sizes (height, width)."""

    target: tuple[int, int]
    resized: tuple[int, int]
    flip: bool
    top: int
    left: int


def resized_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest resize of an image of ``size`` that covers ``target`` (aspect ratio kept, minimal crop)."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def crop_pixels(image: Image.Image, crop: Crop) -> torch.Tensor:
    """The (3, H, W) pixel values in [-1, 1] of ``image`` resized, flipped and cropped as ``crop`` says."""
    image = TF.resize(image, list(crop.resized), interpolation=TF.InterpolationMode.BILINEAR)
    if crop.flip:
        image = TF.horizontal_flip(image)
    image = TF.crop(image, crop.top, crop.left, *crop.target)
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=False) / 127.5 - 1.0


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation) with their prompts, as diffusers' dataset does.

    Images are resized to cover their target (the square resolution, or their aspect-ratio bucket from
    ``bucket_of``), optionally
    flipped and cropped. The random crop, flip and caption augmentation of an item depend only on (seed, epoch,
    index), so a resumed run sees exactly the images a straight run sees. Items also carry the original size and
    crop corner, which SDXL conditions on. With `latents` set (``--cache_latents``), items carry the cached VAE
    distribution of their crop instead of pixels.
    """

    def __init__(
        self,
        instance: Sequence[Record],
        class_records: Sequence[Record] | None = None,
        size: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        *,
        bucket_of: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
        captions: CaptionSettings | None = None,
        repeats: int = 1,
    ) -> None:
        self.instance = list(instance)
        self.class_records = list(class_records) if class_records else []
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.captions = captions or CaptionSettings()
        self.repeats = repeats
        self.epoch = 0
        self.sizes = {id(r): r.size() for r in self.instance + self.class_records}
        # the (height, width) each instance image trains at: its aspect-ratio bucket, or the square resolution
        self.buckets = [bucket_of(self.sizes[id(r)]) if bucket_of else (size, size) for r in self.instance]
        self.latents: Mapping[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return max(len(self.instance) * self.repeats, len(self.class_records))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_buckets(self) -> list[tuple[int, int]]:
        """The target (height, width) of every index (what `buckets.BucketBatchSampler` groups by)."""
        return [self.buckets[i % len(self.instance)] for i in range(len(self))]

    def crop(self, record: Record, target: tuple[int, int], generator: torch.Generator) -> Crop:
        """The crop of one draw: flip first, then the corner (the order diffusers' transforms draw in)."""
        height, width = resized_size(self.sizes[id(record)], target)
        flip = bool(self.random_flip and torch.rand((), generator=generator) < 0.5)
        if self.center_crop:
            top, left = (height - target[0]) // 2, (width - target[1]) // 2
        else:
            top = int(torch.randint(0, height - target[0] + 1, (), generator=generator))
            left = int(torch.randint(0, width - target[1] + 1, (), generator=generator))
        return Crop(target, (height, width), flip, top, left)

    def crops(self, record: Record, target: tuple[int, int]) -> list[Crop]:
        """Every crop an item of ``record`` can draw (what ``--cache_latents`` encodes)."""
        height, width = resized_size(self.sizes[id(record)], target)
        if self.center_crop:
            corners = [((height - target[0]) // 2, (width - target[1]) // 2)]
        else:
            corners = [(t, lt) for t in range(height - target[0] + 1) for lt in range(width - target[1] + 1)]
        return [Crop(target, (height, width), flip, top, left)
                for flip in ((False, True) if self.random_flip else (False,)) for top, left in corners]

    def records_and_targets(self) -> list[tuple[Record, tuple[int, int]]]:
        """Each record once with its target size: instance records in their bucket, class records square."""
        square = (self.size, self.size)
        return list(zip(self.instance, self.buckets, strict=True)) + [(r, square) for r in self.class_records]

    def _load(self, record: Record, target: tuple[int, int], generator: torch.Generator, caption: bool
              ) -> dict[str, Any]:
        crop = self.crop(record, target, generator)
        prompt = augment_caption(record.prompt, self.captions, generator) if caption else record.prompt
        item = {"prompt": prompt, "original_size": self.sizes[id(record)], "crop_top_left": (crop.top, crop.left),
                "target_size": crop.target}
        if self.latents is not None:
            item["latent_parameters"] = self.latents[cache_key(record, crop)]
        else:
            item["pixel_values"] = crop_pixels(record.open(), crop)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        position = index % len(self.instance)
        example = {"instance": self._load(self.instance[position], self.buckets[position], generator, True)}
        if self.class_records:
            record = self.class_records[index % len(self.class_records)]
            example["class"] = self._load(record, (self.size, self.size), generator, False)
        return example


def cache_key(record: Record, crop: Crop) -> str:
    """The latent-cache entry of one crop of one image."""
    return (f"{record.identity()}|{crop.target[0]}x{crop.target[1]}|{crop.resized[0]}x{crop.resized[1]}"
            f"|{int(crop.flip)}|{crop.top},{crop.left}")


def collate_fn(examples: Sequence[dict[str, Any]], with_prior_preservation: bool = False) -> dict[str, Any]:
    """One batch; with prior preservation the class images follow the instance images (one forward pass).

    The batch holds ``pixel_values`` or, with cached latents, ``latent_parameters`` (the VAE distributions).
    """
    items = [e["instance"] for e in examples]
    if with_prior_preservation:
        items += [e["class"] for e in examples]
    images = "latent_parameters" if "latent_parameters" in items[0] else "pixel_values"
    return {
        images: torch.stack([i[images] for i in items]).contiguous(),
        "prompts": [i["prompt"] for i in items],
        "original_sizes": [i["original_size"] for i in items],
        "crop_top_lefts": [i["crop_top_left"] for i in items],
        "target_sizes": [i["target_size"] for i in items],
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
