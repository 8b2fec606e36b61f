"""``--cache_latents`` and ``--pre_compute_text_embeddings``: the frozen VAE and text encoders run once before
training instead of at every step, and ``--cache_dir`` keeps their outputs on disk for later runs.

Latents are cached as the VAE's distribution parameters (mean and log-variance), one entry per crop and flip an
item can draw, and sampled at each step inside the step's seeded RNG: a cached run draws exactly the latents an
uncached run draws. Files are safetensors (never pickle), named by a hash of everything their contents depend on
(model files, precision, images, resolution, augmentation, prompt settings), so a change makes a new file and an
unchanged run reuses the old one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path
from .data import Crop, DreamBoothDataset, cache_key, crop_pixels
from .records import Record

logger = get_logger(__name__)
# Crops per image (times two with --random_flip) beyond which --cache_latents turns the random crop into a centre
# crop: caching every corner of a much larger image would cost more than encoding at every step.
MAX_CACHED_CROPS = 16


def model_files(model: str | Path, subfolders: Iterable[str]) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of a local model's component folders, so a changed weight file changes cache keys
    (a hub id is keyed by its name and revision instead)."""
    root = Path(model)
    if not root.is_dir():
        return []
    return [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
            for sub in subfolders for p in sorted((root / sub).rglob("*")) if p.is_file()]


def latent_key_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What cached latents depend on beyond the crops themselves: the model (or VAE) and its files."""
    vae = args.pretrained_vae_model_name_or_path
    files = model_files(vae, [""]) if vae else model_files(args.pretrained_model_name_or_path, ["vae"])
    return {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
            "vae": vae, "files": files}


def text_key_fields(args: argparse.Namespace, family: str, text_encoders: Sequence[str], dtype: torch.dtype
                    ) -> dict[str, Any]:
    """What precomputed prompt embeddings depend on beyond the prompts: model files, lengths, mask, precision."""
    subfolders = [*text_encoders, *(s.replace("text_encoder", "tokenizer") for s in text_encoders)]
    return {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
            "family": family, "dtype": dtype, "files": model_files(args.pretrained_model_name_or_path, subfolders),
            "max_sequence_length": args.max_sequence_length, "tokenizer_max_length": args.tokenizer_max_length,
            "attention_mask": args.text_encoder_use_attention_mask}


def digest(fields: Mapping[str, Any]) -> str:
    """A short stable hash of ``fields`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_cached(path: Path | None, expected: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and metadata of a cache file holding every ``expected`` entry (``None``: compute them)."""
    if path is None or not path.is_file():
        return None
    tensors = load_file(path)
    if not set(expected) <= tensors.keys():
        logger.warning(f"{path} lacks entries this run needs; computing them again.")
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    logger.info(f"Reusing {path}.")
    return tensors, metadata


def _save(path: Path | None, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v, default=str) for k, v in metadata.items()})
    logger.info(f"Saved {path}.")


def limit_random_crops(dataset: DreamBoothDataset) -> None:
    """Turn a random crop with more than `MAX_CACHED_CROPS` corners for some image into a centre crop (logged)."""
    if dataset.center_crop:
        return
    most = max(len(dataset.crops(r, t)) for r, t in dataset.records_and_targets()) // (1 + dataset.random_flip)
    if most > MAX_CACHED_CROPS:
        dataset.center_crop = True
        logger.warning(f"--cache_latents: an image has {most} crop positions (> {MAX_CACHED_CROPS}); the random crop "
                       "is disabled (centre crop) so each image is encoded once per flip. Use --center_crop or "
                       "--aspect_ratio_buckets to silence this.")


@torch.no_grad()
def cache_latents(
    datasets: Sequence[DreamBoothDataset],
    vae: nn.Module,
    *,
    batch_size: int,
    key_fields: Mapping[str, Any],
    cache_dir: str | Path | None = None,
) -> bool:
    """Encode every crop the ``datasets`` can draw once and give each dataset its entries (``dataset.latents``).

    Returns whether the VAE's output was channels-last (the CPU VAE's is): `sample_latents` lays the cached
    distributions out the same way, so the noise drawn "like" the latents, and every product after it, match an
    uncached run bit for bit.

    Args:
        datasets: the training (and validation) datasets; their augmentation settings are final.
        vae: the pipeline's VAE, on the training device and in its training dtype.
        batch_size: images per VAE call (crops of one size are batched together).
        key_fields: what else the latents depend on (model, VAE files, precision): part of the file's key.
        cache_dir: where the safetensors file is kept and looked for (``None``: in memory only).
    """
    for dataset in datasets:
        limit_random_crops(dataset)
    wanted: dict[str, tuple[Record, Crop]] = {}
    for dataset in datasets:
        for record, target in dataset.records_and_targets():
            for crop in dataset.crops(record, target):
                wanted[cache_key(record, crop)] = (record, crop)
    fields = {**key_fields, "dtype": vae.dtype, "entries": sorted(wanted)}
    path = Path(cache_dir, f"latents-{digest(fields)}.safetensors") if cache_dir else None
    cached = _load_cached(path, wanted)
    if cached is not None:
        tensors, channels_last = cached[0], cached[1]["channels_last"]
    else:
        logger.info(f"Encoding {len(wanted)} crops with the VAE (--cache_latents).")
        tensors = {}
        pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
        layouts = set()

        def flush(target: tuple[int, int]) -> None:
            keys, pixels = zip(*pending.pop(target), strict=True)
            parameters = vae.encode(torch.stack(pixels).to(vae.device, vae.dtype)).latent_dist.parameters
            layouts.add(not parameters.is_contiguous())
            tensors.update(zip(keys, parameters.cpu().contiguous().unbind(0), strict=True))

        by_record: dict[int, list[tuple[str, Crop]]] = defaultdict(list)
        records = {}
        for key, (record, crop) in wanted.items():
            by_record[id(record)].append((key, crop))
            records[id(record)] = record
        for record_id, crops in by_record.items():
            image = records[record_id].open()
            for key, crop in crops:
                pending[crop.target].append((key, crop_pixels(image, crop)))
                if len(pending[crop.target]) >= batch_size:
                    flush(crop.target)
        for target in list(pending):
            flush(target)
        channels_last = layouts == {True}
        _save(path, tensors, {"fields": {k: v for k, v in fields.items() if k != "entries"},
                              "channels_last": channels_last})
    for dataset in datasets:
        dataset.latents = tensors
    return channels_last


def sample_latents(parameters: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A draw from cached VAE distributions, with the same RNG call and memory layout as
    ``vae.encode(x).latent_dist.sample()``."""
    if channels_last:
        parameters = parameters.contiguous(memory_format=torch.channels_last)
    return DiagonalGaussianDistribution(parameters).sample()


class TextEmbeddingCache:
    """Precomputed prompt conditioning, called like a family's `PromptEncoder`: ``cache(prompts, device)``.

    ``shared`` holds the outputs that are one tensor for the whole batch (Flux's ``txt_ids``).
    """

    def __init__(self, per_prompt: Mapping[str, Mapping[str, torch.Tensor]], shared: Mapping[str, torch.Tensor]
                 ) -> None:
        self.per_prompt = per_prompt
        self.shared = shared

    def __call__(self, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        keys = self.per_prompt[prompts[0]].keys()
        batch = {k: torch.stack([self.per_prompt[p][k] for p in prompts]).to(device) for k in keys}
        return {**batch, **{k: v.to(device) for k, v in self.shared.items()}}


@torch.no_grad()
def cache_text_embeddings(
    prompts: Iterable[str],
    encode: Any,
    device: torch.device,
    *,
    shared_keys: Sequence[str],
    batch_size: int,
    key_fields: Mapping[str, Any],
    cache_dir: str | Path | None = None,
) -> TextEmbeddingCache:
    """Encode each distinct prompt once (``--pre_compute_text_embeddings``).

    Args:
        prompts: every prompt training can feed (captions, the instance / class prompt, "" for caption dropout).
        encode: the family's prompt encoder (``encode(prompts, device)`` → conditioning dict).
        device: where the text encoders run.
        shared_keys: outputs that are one tensor per batch rather than one row per prompt.
        batch_size: prompts per encoder call.
        key_fields: what else the embeddings depend on (model, text-encoder files, lengths): part of the key.
        cache_dir: where the safetensors file is kept and looked for (``None``: in memory only).
    """
    unique = sorted(set(prompts))
    fields = {**key_fields, "prompts": unique}
    path = Path(cache_dir, f"text-{digest(fields)}.safetensors") if cache_dir else None
    cached = _load_cached(path, {f"{i}/encoder_hidden_states" for i in range(len(unique))})
    tensors = cached[0] if cached is not None else {}
    if cached is None:
        logger.info(f"Encoding {len(unique)} distinct prompts once (--pre_compute_text_embeddings).")
        for start in range(0, len(unique), batch_size):
            outputs = encode(unique[start : start + batch_size], device)
            for key, value in outputs.items():
                if key in shared_keys:
                    tensors[f"shared/{key}"] = value.cpu()
                    continue
                for offset, row in enumerate(value.cpu().unbind(0)):
                    tensors[f"{start + offset}/{key}"] = row
        _save(path, tensors, {"fields": {k: v for k, v in fields.items() if k != "prompts"}})
    per_prompt: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    shared = {}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        if index == "shared":
            shared[key] = value
        else:
            per_prompt[unique[int(index)]][key] = value
    return TextEmbeddingCache(dict(per_prompt), shared)


@contextlib.contextmanager
def onloaded(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Move offloaded ``modules`` to ``device`` for a while (validation), and back to the CPU afterwards."""
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        offload(modules)


def offload(modules: Sequence[nn.Module]) -> None:
    """Move modules that training no longer runs to the CPU, freeing the accelerator's memory."""
    for module in modules:
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
