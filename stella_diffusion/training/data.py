"""Serving the training records: seeded caption augmentation, crops and flips, the dataset, the batch order, and
the class images of prior preservation. Everything depends only on seeds, so a resumed run sees what a straight run
sees, on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from diffusers import DiffusionPipeline
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..files import is_readable_image
from .records import Record, derived_seed


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
