"""Aspect-ratio buckets (kohya's ``--enable_bucket``): each image trains at the bucket closest to its own aspect
ratio, and every batch comes from one bucket, so no image is squashed or cropped to a square.

Buckets are the (height, width) pairs with both sides multiples of ``step``, sides in [min_side, max_side] and
an area of at most ``resolution²`` (kohya's ``make_bucket_resolutions``). The batch order depends only on
(seed, epoch), like `data.EpochShuffleSampler`, so a resume and every process see the same batches.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .config import TrainingError
from .data import EpochShuffleSampler
from .records import derived_seed


def bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Every (height, width) bucket of area ≤ ``resolution²``: for each width, the tallest height that fits.

    Args:
        resolution: the side of the square whose area bounds every bucket.
        min_side: the smallest side of a bucket.
        max_side: the largest side of a bucket.
        step: both sides are multiples of this (the VAE's and the denoiser's patch multiple).
    """
    if min_side > max_side or min_side < step or min_side % step or max_side % step:
        raise TrainingError(f"--min_bucket_reso {min_side} / --max_bucket_reso {max_side} must be multiples of "
                            f"--bucket_reso_steps {step} with min ≤ max.")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def bucket_settings(args: argparse.Namespace, multiple: int) -> tuple[int, int, int]:
    """(min side, max side, step) from ``--min_bucket_reso --max_bucket_reso --bucket_reso_steps``; defaults are
    kohya's at 512 px (256, 1024, 64) and scale with ``--resolution``. The step must be a multiple of the family's
    ``multiple`` (8 for the UNets, 16 for Flux)."""
    step = args.bucket_reso_steps or (64 if args.resolution >= 512 else multiple)
    if step % multiple:
        raise TrainingError(f"--bucket_reso_steps must be a multiple of {multiple} for this pipeline, got {step}.")
    min_side = args.min_bucket_reso or max(step, args.resolution // 2 // step * step)
    max_side = args.max_bucket_reso or args.resolution * 2 // step * step
    return min_side, max_side, step


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared in log scale, so 2:1 and 1:2 are alike)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket, in an order that depends only on (seed, epoch).

    Each epoch the items are shuffled (``self.sampler``, whose ``set_epoch`` accelerate calls), cut into batches
    per bucket (the last one of a bucket may be smaller), and the batches are shuffled. Without ``shuffle`` the
    order is fixed (validation).
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sampler = EpochShuffleSampler(len(self.buckets), seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        order = list(self.sampler) if self.shuffle else range(len(self.buckets))
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in order:
            members[self.buckets[index]].append(index)
        batches = [items[start : start + self.batch_size] for _, items in sorted(members.items())
                   for start in range(0, len(items), self.batch_size)]
        if not self.shuffle:
            return batches
        generator = torch.Generator().manual_seed(derived_seed(self.sampler.seed, self.sampler.epoch, 1))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for bucket in self.buckets:
            counts[bucket] += 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())
