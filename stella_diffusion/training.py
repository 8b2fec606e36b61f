"""Library side of ``train_dreambooth_stella.py``: what the script needs beyond diffusers and accelerate.

The script stays one readable file in the shape of diffusers' ``train_dreambooth_lora.py``; everything here is
a piece it calls: ``--config`` YAML merging and input checks (one clear error before training starts), the two
data modes (DreamBooth folder + prompt, captioned ``metadata.jsonl`` folder) with image validation, prompt
encoding and the diffusion loss per pipeline family (DDPM epsilon / v-prediction with min-SNR for SD 1.x/2.x and
SDXL UNets, flow matching for SD3 and Flux), the adapters (StelLA and the peft LoRA / DoRA / PiSSA baselines),
their checkpoint files and LoRA exports, the NaN guard, the loss / orthonormality plot and the model card.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import extract_model_from_parallel
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, Sampler

from .evaluation import EvalPrompt, build_fid_metric, cycle_prompts, read_eval_prompts
from .generate import METADATA_FILE, read_jsonl
from .images import UnreadableImageWarning, to_rgb
from .metrics import StreamingFID
from .optim import make_riemannian, stella_parameter_groups
from .pipelines import (
    LORA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    add_stella_adapter,
    default_target_modules,
    inject_adapter,
    load_stella_checkpoint,
    lora_metadata,
    save_lora_export,
    save_lora_state_dicts,
    save_stella_checkpoint,
)

ADAPTERS = ("stella", "lora", "dora", "pissa")
PEFT_WEIGHT_NAME = "peft_adapter.safetensors"
ADAPTER_SETTINGS_NAME = "adapter_settings.json"
PLOT_NAME = "training_curves.png"
HISTORY_NAME = "training_history.json"
EVAL_DIR = "eval"  # under --output_dir: the evaluation images and report

# model_index.json's `_class_name` → the family the script knows how to train.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",  # SD 1.x and 2.x
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
# Every text encoder a family conditions on, and those `--train_text_encoder` adapts: the T5 encoders of SD3 and
# Flux stay frozen, as in diffusers' scripts (their `save_lora_weights` has no slot for T5 either).
TEXT_ENCODERS = {
    "sd": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}
TRAINABLE_TEXT_ENCODERS = {
    "sd": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder",),
}
# The pipelines' own default T5 length, so training sees the conditioning inference will give.
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


class TrainingError(RuntimeError):
    """Bad input or a run that must stop; the script prints the message as one line and exits non-zero."""


# --------------------------------------------------------------------------------------------------------------
# Arguments: --config YAML defaults, input checks


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``--config FILE.yaml`` as defaults that command-line flags override.

    YAML keys are the flags' names without dashes (``learning_rate: 8.0e-4``). The values go through the
    parser itself, so types and choices are checked exactly as on the command line, and an unknown key is an
    error rather than a silently ignored typo.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    namespace = argparse.Namespace()
    if known.config:
        namespace = parser.parse_args(config_to_argv(parser, read_yaml_config(known.config), known.config))
    return parser.parse_args(argv, namespace=namespace)


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; a missing file or a file that is not a mapping is a `TrainingError`."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TrainingError(f"--config {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainingError(f"--config {path} must be a mapping of flag names to values.")
    return values


def config_to_argv(parser: argparse.ArgumentParser, values: Mapping[str, Any], source: str | Path) -> list[str]:
    """Command-line tokens for config ``values`` (``None`` = not set; booleans → ``--flag`` / ``--no-flag``)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # argparse has no public action lookup
    argv: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise TrainingError(f"--config {source}: unknown key {key!r} (keys are the script's flag names).")
        if value is None:
            continue
        flag = f"--{dest}"
        if isinstance(actions[dest], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise TrainingError(f"--config {source}: {key} must be true or false, got {value!r}.")
            argv.append(flag if value else f"--no-{dest}")
        elif isinstance(value, bool) and actions[dest].choices is not None:
            raise TrainingError(f"--config {source}: {key}: {value!r} is not one of {actions[dest].choices} "
                                "(YAML reads unquoted no / yes / off / on as booleans: quote the value).")
        elif isinstance(value, list):  # a list for a comma-separated flag such as --lora_layers
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def bool_or_float(value: str) -> bool | float:
    """argparse type of ``--stella_grad_scaling``: ``true`` / ``false`` or a reference width."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    try:
        width = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or a positive number, got {value!r}") from None
    if width <= 0:
        raise argparse.ArgumentTypeError(f"a reference width must be positive, got {value!r}")
    return width


def pipeline_family(model: str | Path, revision: str | None = None) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux``, read from the model's ``model_index.json``."""
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise TrainingError(
            f"--pretrained_model_name_or_path {model} is not a diffusers pipeline folder (no model_index.json)."
        )
    try:
        index = DiffusionPipeline.load_config(str(model), revision=revision)
    except Exception as err:  # hub / file errors come in many classes; all mean "no pipeline there"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"--pretrained_model_name_or_path {model}: no diffusers pipeline ({first}).") from err
    name = index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        raise TrainingError(
            f"--pretrained_model_name_or_path {model} is a {name}; supported: {', '.join(PIPELINE_FAMILIES)}."
        )
    return PIPELINE_FAMILIES[name]


def check_args(args: argparse.Namespace) -> None:
    """The input checks that need no model or data; each failure is one `TrainingError` line."""
    if args.pretrained_model_name_or_path is None:
        raise TrainingError("--pretrained_model_name_or_path is required.")
    if args.instance_data_dir is None:
        raise TrainingError("--instance_data_dir is required (the DreamBooth images or the captioned image folder).")
    for flag in ("rank", "train_batch_size", "gradient_accumulation_steps", "resolution"):
        value = getattr(args, flag)
        if value <= 0:
            raise TrainingError(f"--{flag} must be a positive integer, got {value}.")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise TrainingError(f"--lora_alpha must be positive, got {args.lora_alpha}.")
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise TrainingError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from None
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers`.")


def evaluation_setup(args: argparse.Namespace) -> tuple[list[EvalPrompt], StreamingFID] | None:
    """The prompts and the FID metric of the post-training evaluation (``None`` without ``--eval_reference_dir``).

    Built before training, so a missing reference, prompt file or Inception weights fail at once. Prompts come
    from ``--eval_prompts``, else the instance prompt (DreamBooth), else the validation prompt.
    """
    if args.eval_reference_dir is None:
        return None
    reference = Path(args.eval_reference_dir)
    if not (reference.is_dir() or (reference.suffix == ".npz" and reference.is_file())):
        raise TrainingError(f"--eval_reference_dir {reference}: no such image folder or .npz statistics file.")
    if args.num_eval_images <= 0:
        raise TrainingError(f"--num_eval_images must be a positive integer, got {args.num_eval_images}.")
    try:
        if args.eval_prompts is not None:
            prompts = read_eval_prompts(args.eval_prompts)
        elif args.instance_prompt or args.validation_prompt:
            prompts = [EvalPrompt(args.instance_prompt or args.validation_prompt)]
        else:
            raise TrainingError("--eval_reference_dir needs --eval_prompts, --instance_prompt or --validation_prompt.")
        metric = build_fid_metric(args.eval_feature_extractor, seed=args.seed or 0)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as err:
        raise TrainingError(f"Evaluation set-up: {err}") from err
    return cycle_prompts(prompts, args.num_eval_images), metric


# --------------------------------------------------------------------------------------------------------------
# Data: DreamBooth folders and captioned folders


@dataclass(frozen=True)
class ImageRecord:
    """One training image and the prompt it is trained with."""

    path: Path
    prompt: str


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    return True


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
        if _is_image(path):
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
        path = folder / row["file_name"]
        if path.is_file() and _is_image(path):
            records.append(ImageRecord(path, str(row[caption_column])))
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
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            image = ImageOps.mirror(image)
        if self.center_crop:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        else:
            top = int(torch.randint(0, height - self.size + 1, (), generator=generator))
            left = int(torch.randint(0, width - self.size + 1, (), generator=generator))
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
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
    present = [p for p in sorted(class_dir.iterdir()) if p.is_file() and _is_image(p)]
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


# --------------------------------------------------------------------------------------------------------------
# Prompt encoding and the diffusion loss, per pipeline family


class PromptEncoder:
    """Captions → the conditioning each family's denoiser takes, computed as its diffusers pipeline does.

    The text encoders may be wrapped by accelerate (DDP), which is why this does not simply call the pipeline's
    ``encode_prompt``: a trained encoder must run through its wrapper so gradients are synchronised.
    """

    def __init__(
        self,
        family: str,
        tokenizers: Mapping[str, Any],
        text_encoders: Mapping[str, nn.Module | None],
        max_sequence_length: int | None = None,
        joint_attention_dim: int | None = None,
    ) -> None:
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH.get(family)
        self.joint_attention_dim = joint_attention_dim

    def _ids(self, slot: str, prompts: Sequence[str], max_length: int, device: torch.device) -> torch.Tensor:
        tokenizer = self.tokenizers[slot.replace("text_encoder", "tokenizer")]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
        return tokens.input_ids.to(device)

    def _clip(self, slot: str, prompts: Sequence[str], device: torch.device, max_length: int | None = None) -> Any:
        max_length = max_length or self.tokenizers[slot.replace("text_encoder", "tokenizer")].model_max_length
        return self.text_encoders[slot](self._ids(slot, prompts, max_length, device), output_hidden_states=True)

    def __call__(self, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        if self.family == "sd":
            encoder = self.text_encoders["text_encoder"]
            tokenizer = self.tokenizers["tokenizer"]
            tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            use_mask = getattr(extract_model_from_parallel(encoder).config, "use_attention_mask", False)
            mask = tokens.attention_mask.to(device) if use_mask else None
            return {"encoder_hidden_states": encoder(tokens.input_ids.to(device), attention_mask=mask)[0]}
        if self.family == "sdxl":
            outputs = [self._clip(slot, prompts, device) for slot in ("text_encoder", "text_encoder_2")]
            return {
                "encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in outputs], dim=-1),
                "pooled_projections": outputs[-1][0],
            }
        if self.family == "sd3":
            clip_length = self.tokenizers["tokenizer"].model_max_length  # the pipeline uses tokenizer 1's length
            outputs = [self._clip(slot, prompts, device, clip_length) for slot in ("text_encoder", "text_encoder_2")]
            clip_embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
            if self.text_encoders.get("text_encoder_3") is None:
                t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim,
                                 device=device, dtype=clip_embeds.dtype)
            else:
                ids = self._ids("text_encoder_3", prompts, self.max_sequence_length, device)
                t5 = self.text_encoders["text_encoder_3"](ids)[0]
            clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
            return {
                "encoder_hidden_states": torch.cat([clip_embeds, t5.to(clip_embeds.dtype)], dim=-2),
                "pooled_projections": torch.cat([o[0] for o in outputs], dim=-1),
            }
        # flux: pooled CLIP output and T5 states
        clip_ids = self._ids("text_encoder", prompts, self.tokenizers["tokenizer"].model_max_length, device)
        pooled = self.text_encoders["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._ids("text_encoder_2", prompts, self.max_sequence_length, device)
        embeds = self.text_encoders["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
        return {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
        }


@dataclass(frozen=True)
class LossSettings:
    """The loss flags (diffusers' names): UNet DDPM ones and flow-matching ones; the family picks its own."""

    snr_gamma: float | None = None
    noise_offset: float = 0.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5


def encode_latents(vae: nn.Module, pixel_values: torch.Tensor, family: str) -> torch.Tensor:
    """VAE latents scaled (and, for SD3 / Flux, shifted) the way the family's pipeline decodes them."""
    latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) if family in ("sd3", "flux") else None
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
    error = (prediction.float() - target.float()) ** 2
    if weight is not None:
        error = weight.float() * error
    return error.mean(dim=tuple(range(1, error.ndim)))


def sdxl_time_ids(batch: Mapping[str, Any], resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning per image: original size, crop corner, target size."""
    rows = [list(size) + list(crop) + [resolution, resolution]
            for size, crop in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)]
    return torch.tensor(rows, device=device, dtype=torch.float32)


def diffusion_loss(
    family: str,
    denoiser: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: Mapping[str, torch.Tensor],
    settings: LossSettings,
) -> torch.Tensor:
    """Per-sample training loss of the family: DDPM for the UNets, flow matching for SD3 / Flux."""
    if family in ("sd", "sdxl"):
        return unet_loss(denoiser, scheduler, latents, conditioning, settings)
    return flow_matching_loss(denoiser, scheduler, latents, conditioning, settings, family)


def unet_loss(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: Mapping[str, torch.Tensor],
    settings: LossSettings,
) -> torch.Tensor:
    """Per-sample DDPM loss (epsilon or v-prediction), min-SNR weighted with ``snr_gamma``.

    SDXL's conditioning also carries ``time_ids`` (see `sdxl_time_ids`) next to the pooled projection.
    """
    noise = torch.randn_like(latents)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                            device=latents.device, dtype=latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise TrainingError(f"Unknown prediction type {prediction_type!r} (use epsilon or v_prediction).")
    kwargs = {}
    if "time_ids" in conditioning:
        kwargs["added_cond_kwargs"] = {"text_embeds": conditioning["pooled_projections"],
                                       "time_ids": conditioning["time_ids"]}
    prediction = unet(noisy, timesteps, conditioning["encoder_hidden_states"], return_dict=False, **kwargs)[0]
    loss = _per_sample_mse(prediction, target)
    if settings.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=settings.snr_gamma)
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        loss = loss * weights
    return loss


def flow_matching_loss(
    transformer: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: Mapping[str, torch.Tensor],
    settings: LossSettings,
    family: str,
) -> torch.Tensor:
    """Per-sample rectified-flow loss of SD3 / Flux: predict ``noise − latents`` at ``(1−σ) x + σ ε``."""
    noise = torch.randn_like(latents)
    batch = latents.shape[0]
    u = compute_density_for_timestep_sampling(settings.weighting_scheme, batch, settings.logit_mean,
                                              settings.logit_std, settings.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if family == "sd3":
        prediction = transformer(hidden_states=noisy, timestep=timesteps,
                                 encoder_hidden_states=conditioning["encoder_hidden_states"],
                                 pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]
    else:
        _, channels, height, width = latents.shape
        model = extract_model_from_parallel(transformer)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((batch,), settings.guidance_scale, device=latents.device, dtype=latents.dtype)
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device,
                                                           latents.dtype)
        packed_prediction = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                        pooled_projections=conditioning["pooled_projections"],
                                        encoder_hidden_states=conditioning["encoder_hidden_states"],
                                        txt_ids=conditioning["txt_ids"], img_ids=image_ids, return_dict=False)[0]
        # _unpack_latents takes the image size in pixels; a scale factor of 1 makes that the latent size
        prediction = FluxPipeline._unpack_latents(packed_prediction, height, width, 1)
    weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)
    return _per_sample_mse(prediction, noise - latents, weighting)


def prior_preservation_loss(per_sample: torch.Tensor, with_prior: bool, prior_loss_weight: float) -> torch.Tensor:
    """Mean instance loss, plus ``prior_loss_weight`` × mean class loss (class images are the second half)."""
    if not with_prior:
        return per_sample.mean()
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


@contextlib.contextmanager
def step_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG (CPU and the training GPU) for one micro-step, and restore it afterwards.

    Noise, timesteps and VAE sampling then depend only on (run seed, epoch, batch, rank): a resumed run draws
    exactly what a straight run draws, whatever happened to the global RNG in between.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------
# Adapters: StelLA and the peft baselines (LoRA, DoRA, PiSSA)


@dataclass
class AdapterSpec:
    """Which adapter to train and how; the fields that fix its parameters are compared on resume."""

    adapter: str = "stella"
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    denoiser_targets: list[str] | None = None
    train_text_encoder: bool = False
    stella_init: str = "orthonormal"
    stella_diag_s: bool = False
    stella_retraction: str = "polar"
    stella_grad_scaling: bool | float = True
    initial_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdapterSpec:
        targets = [t.strip() for t in args.lora_layers.split(",")] if args.lora_layers else None
        return cls(args.adapter, args.rank, args.lora_alpha, args.lora_dropout, targets, args.train_text_encoder,
                   args.stella_init, args.stella_diag_s, args.stella_retraction, args.stella_grad_scaling)

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (the optimizer-side StelLA flags may change)."""
        settings = {"adapter": self.adapter, "rank": self.rank, "lora_alpha": self.scale_alpha,
                    "lora_dropout": self.dropout, "lora_layers": self.denoiser_targets,
                    "train_text_encoder": self.train_text_encoder}
        if self.adapter == "stella":
            settings.update(stella_init=self.stella_init, stella_diag_s=self.stella_diag_s)
        return settings

    def add_to(self, component: str, model: nn.Module) -> None:
        """Add the adapter to one pipeline component (in float32, before any cast to the training dtype)."""
        targets = self.denoiser_targets if component in ("unet", "transformer") and self.denoiser_targets else None
        targets = targets or default_target_modules(model)
        if self.adapter == "stella":
            add_stella_adapter(model, r=self.rank, alpha=self.scale_alpha, dropout=self.dropout,
                               target_modules=targets, init_weights=self.stella_init, diag_s=self.stella_diag_s,
                               retraction=self.stella_retraction, grad_scaling=self.stella_grad_scaling)
            return
        init = {"lora": "gaussian", "dora": "gaussian", "pissa": "pissa"}[self.adapter]
        inject_adapter(model, LoraConfig(r=self.rank, lora_alpha=self.scale_alpha, lora_dropout=self.dropout,
                                         init_lora_weights=init, use_dora=self.adapter == "dora",
                                         target_modules=targets))
        if self.adapter == "pissa":
            # PiSSA moved the principal part of W into the adapter; the export subtracts this start again
            start = get_peft_model_state_dict(model)
            self.initial_states[component] = {k: v.detach().clone() for k, v in start.items()}

    def build_optimizer(
        self, models: Sequence[nn.Module], optimizer_cls: type[torch.optim.Optimizer], weight_decay: float,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        """The optimizer over the adapters; StelLA's is made Riemannian, with U and V out of weight decay."""
        if self.adapter == "stella":
            groups = stella_parameter_groups(nn.ModuleList(models), weight_decay)
            optimizer = optimizer_cls(groups, **kwargs)
            make_riemannian(optimizer, list(models), retraction=self.stella_retraction,
                            grad_scaling=self.stella_grad_scaling)
            return optimizer
        params = [p for m in models for p in m.parameters() if p.requires_grad]
        return optimizer_cls([{"params": params, "weight_decay": weight_decay}], **kwargs)

    def save(self, directory: str | Path, components: Mapping[str, nn.Module]) -> None:
        """The resumable adapter state: StelLA's native file, or the peft state dicts of the baselines."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter == "stella":
            save_stella_checkpoint(directory, components)
        else:
            tensors = {f"{name}.{key}": value.detach().float().contiguous().cpu()
                       for name, model in components.items()
                       for key, value in get_peft_model_state_dict(model).items()}
            save_file(tensors, directory / PEFT_WEIGHT_NAME)
        (directory / ADAPTER_SETTINGS_NAME).write_text(json.dumps(self.settings(), indent=2) + "\n")

    def load(self, directory: str | Path, components: Mapping[str, nn.Module]) -> None:
        """Restore what `save` wrote into the (already adapted) components."""
        directory = Path(directory)
        if self.adapter == "stella":
            load_stella_checkpoint(directory, components)
            return
        path = directory / PEFT_WEIGHT_NAME
        if not path.is_file():
            raise TrainingError(f"{directory} has no {PEFT_WEIGHT_NAME}: not a checkpoint of a {self.adapter} run.")
        tensors = load_file(path)
        for name, model in components.items():
            prefix = f"{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None) or len(state) != len(get_peft_model_state_dict(model)):
                raise TrainingError(f"{path} does not match the `{name}` adapter of this run.")

    def export(self, output_dir: str | Path, pipeline_cls: type, components: Mapping[str, nn.Module]) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that a stock pipeline loads with ``load_lora_weights``."""
        if self.adapter == "stella":
            return save_lora_export(output_dir, pipeline_cls, components)
        return save_peft_lora_export(output_dir, pipeline_cls, components, self.initial_states)


@torch.no_grad()
def plain_lora_state_dict(model: nn.Module, initial_state: Mapping[str, torch.Tensor] | None = None) -> dict:
    """A peft LoRA / DoRA adapter as an alpha = r LoRA (scale baked into ``lora_B``); PiSSA converted to LoRA.

    Baking the scale makes the file mean the same to every consumer (some ignore alpha). With
    ``initial_state`` (PiSSA's start ``B₀ A₀``, which was subtracted from the base weight), the adapter becomes
    ``ΔW = s (B A − B₀ A₀) = [sB, −sB₀] [A; A₀]`` on the untouched base — peft's own conversion, in one step.
    """
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        scale = layer.scaling["default"]
        if initial_state is not None:
            state[key_a] = torch.cat([state[key_a], initial_state[key_a].float()], dim=0)
            state[key_b] = torch.cat([state[key_b], -initial_state[key_b].float()], dim=1)
        state[key_b] = scale * state[key_b]
    # DoRA's magnitude as `….lora_magnitude_vector.weight`: diffusers' UNet / transformer loader reads either
    # spelling, but text encoders load through transformers, which drops the key without `.weight`
    return {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v.contiguous() for k, v in state.items()}


def save_peft_lora_export(
    output_dir: str | Path,
    pipeline_cls: type,
    components: Mapping[str, nn.Module],
    initial_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """The baselines' export through ``pipeline_cls.save_lora_weights``, with alpha = r metadata like StelLA's."""
    states = {}
    for name, model in components.items():
        state = plain_lora_state_dict(model, (initial_states or {}).get(name))
        metadata = lora_metadata(state)
        if any("lora_magnitude_vector" in k for k in state):
            metadata["use_dora"] = True
        states[name] = (state, metadata)
    return save_lora_state_dicts(output_dir, pipeline_cls, states)


def enable_xformers(model: nn.Module) -> None:
    """diffusers' xformers switch, with one clear error where xformers is installed but cannot run.

    An xformers wheel built for another torch imports fine but has no CUDA kernel (diffusers' probe then raises
    "No operator found"); on CPU diffusers refuses it outright.
    """
    try:
        model.enable_xformers_memory_efficient_attention()
    except (NotImplementedError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"--enable_xformers_memory_efficient_attention: xformers cannot run here ({reason}). It needs a CUDA "
            f"GPU and an xformers build for torch {torch.__version__}; without the flag PyTorch's own "
            "scaled-dot-product attention is used."
        ) from err


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model to ``dtype`` but keep every trainable parameter's float32 values untouched.

    Casting the whole model and upcasting the adapters afterwards (diffusers' way) would round StelLA's U and V
    off the Stiefel manifold; trainable fp16 weights are the "Attempting to unscale FP16 gradients" error.
    """
    if all(p.dtype == dtype for p in model.parameters() if not p.requires_grad):
        return
    trainable = [(p, p.data.float()) for p in model.parameters() if p.requires_grad]
    model.to(dtype)
    for param, data in trainable:
        param.data = data


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: resume path, compatibility, rotation, the NaN guard


def checkpoint_step(path: str | Path) -> int:
    """The global step of a ``checkpoint-{step}`` folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise TrainingError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500).")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-{step}`` folders of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | Path, value: str | None) -> Path | None:
    """``--resume_from_checkpoint``: ``latest`` (None when there is none yet), a path, or a name in ``output_dir``."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(value), Path(output_dir) / value):
        if candidate.is_dir():
            checkpoint_step(candidate)
            return candidate
    raise TrainingError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")


def check_resume_compatible(checkpoint: Path, spec: AdapterSpec) -> None:
    """Refuse a checkpoint whose adapter configuration differs from the requested one, naming each difference."""
    path = checkpoint / ADAPTER_SETTINGS_NAME
    if not path.is_file():
        raise TrainingError(f"--resume_from_checkpoint {checkpoint}: no {ADAPTER_SETTINGS_NAME}, not a checkpoint of "
                            "this script.")
    saved = json.loads(path.read_text())
    wanted = spec.settings()
    differences = [f"{key} {saved.get(key)!r} (checkpoint) vs {wanted.get(key)!r} (requested)"
                   for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
    if differences:
        raise TrainingError(f"--resume_from_checkpoint {checkpoint} has a different adapter configuration: "
                            f"{'; '.join(differences)}.")


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Before saving a new checkpoint, remove the oldest so that at most ``total_limit`` remain afterwards."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit + 1)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def check_finite_loss(loss: float, step: int, output_dir: str | Path) -> None:
    """Stop the run when the loss is NaN / inf; the checkpoints already saved are left as they are."""
    if math.isfinite(loss):
        return
    found = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been saved yet"
    raise TrainingError(f"The loss became {loss} at step {step}; training stopped, {kept}.")


class TrainingHistory:
    """Loss, learning rate and ``max|UᵀU − I|`` per optimizer step; saved inside every checkpoint."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, **record: Any) -> None:
        self.records.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = list(state["records"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.records, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Outputs: validation grids, the plot, the model card


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """The images side by side (``columns`` per row, default all in one row)."""
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A PNG of the loss per step and of ``max|UᵀU − I|`` (StelLA only) on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    errors = [r.get("orthonormality_error") for r in records]
    fig, (ax_loss, ax_orth) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in records], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    if any(e is not None for e in errors):
        ax_orth.semilogy(steps, [max(e, 1e-12) if e is not None else float("nan") for e in errors], lw=0.8)
        ax_orth.set(xlabel="step", ylabel="max |UᵀU − I|, |VᵀV − I|", title="orthonormality error")
    else:
        ax_orth.text(0.5, 0.5, "no orthonormal factors\n(peft baseline)", ha="center", va="center")
        ax_orth.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str,
    family: str,
    spec: AdapterSpec,
    prompt: str | None,
    validation_prompt: str | None,
    images: Sequence[Image.Image] = (),
    settings: Mapping[str, Any] | None = None,
    evaluation: str | None = None,
) -> Path:
    """``README.md`` in the shape of diffusers' DreamBooth LoRA cards, saying how to load the export.

    ``evaluation`` is a Markdown section (the post-training FID report) added at the end.
    """
    output_dir = Path(output_dir)
    image_lines = []
    for i, image in enumerate(images):
        image.save(output_dir / f"image_{i}.png")
        image_lines.append(f"![img_{i}](./image_{i}.png)")
    method = "StelLA (Stiefel low-rank adaptation)" if spec.adapter == "stella" else spec.adapter.upper()
    header = {
        "base_model": base_model,
        "library_name": "diffusers",
        "tags": ["text-to-image", "diffusers", "diffusers-training", "lora", spec.adapter, family],
        **({"instance_prompt": prompt} if prompt else {}),
    }
    mode = f"DreamBooth on the prompt `{prompt}`" if prompt else "captioned fine-tuning"
    example = json.dumps(validation_prompt or prompt or "a photo")
    native = f"\n`{NATIVE_WEIGHT_NAME}` keeps StelLA's factors U, S, V (to resume with stella_diffusion).\n"
    native = native if spec.adapter == "stella" else ""
    rows = "\n".join(f"| {k} | {v} |" for k, v in (settings or {}).items())
    images_text = "\n".join(image_lines) if image_lines else "(no --validation_prompt was given)"
    text = f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip()}
---

# {method} adapter for {base_model}

Trained with `train_dreambooth_stella.py` ({mode}). `{LORA_WEIGHT_NAME}` is a plain rank-{spec.rank} LoRA
(scale baked into `lora_B`, alpha = rank in its metadata), so a stock diffusers pipeline loads it; the text
encoder was {"" if spec.train_text_encoder else "not "}trained.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")
image = pipe({example}).images[0]
```
{native}
## Validation images

{images_text}

## Training settings

| setting | value |
|---|---|
{rows}
"""
    if evaluation:
        text += "\n" + evaluation.replace("## ", "## Evaluation: ", 1)
    path = output_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
