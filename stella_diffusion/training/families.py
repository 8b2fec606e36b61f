"""What training needs to know about each kind of pipeline, in one class per family.

A family says which component denoises, which text encoders condition it (and which of them may be trained),
how captions become its conditioning (exactly as its diffusers pipeline computes it), how images become
latents, and its training loss: DDPM epsilon / v-prediction with min-SNR weighting for the SD 1.x/2.x and SDXL
UNets, rectified flow for SD3 and Flux. Adding a family (Sana, say) is one subclass and one line in `FAMILIES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from torch import nn

from .config import TrainingError


@dataclass(frozen=True)
class LossSettings:
    """The loss flags (diffusers' names): UNet DDPM ones and flow-matching ones; each family reads its own."""

    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
    error = (prediction.float() - target.float()) ** 2
    if weight is not None:
        error = weight.float() * error
    return error.mean(dim=tuple(range(1, error.ndim)))


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


class PromptEncoder:
    """Captions → the conditioning a family's denoiser takes, computed as its diffusers pipeline does.

    The text encoders may be wrapped by accelerate (DDP), which is why this does not simply call the pipeline's
    ``encode_prompt``: a trained encoder must run through its wrapper so gradients are synchronised.
    """

    def __init__(self, family: PipelineFamily, tokenizers: Mapping[str, Any], text_encoders: Mapping[str, Any],
                 max_sequence_length: int | None = None, joint_attention_dim: int | None = None,
                 tokenizer_max_length: int | None = None, use_attention_mask: bool = False) -> None:
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.max_sequence_length = max_sequence_length or family.max_sequence_length
        self.joint_attention_dim = joint_attention_dim
        self.tokenizer_max_length = tokenizer_max_length  # SD 1.x / 2.x (diffusers' --tokenizer_max_length)
        self.use_attention_mask = use_attention_mask  # SD 1.x / 2.x (--text_encoder_use_attention_mask)

    def ids(self, slot: str, prompts: Sequence[str], max_length: int, device: torch.device) -> torch.Tensor:
        """Token ids of ``prompts`` for the text encoder in ``slot``, padded to ``max_length``."""
        tokenizer = self.tokenizers[slot.replace("text_encoder", "tokenizer")]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
        return tokens.input_ids.to(device)

    def clip(self, slot: str, prompts: Sequence[str], device: torch.device, max_length: int | None = None) -> Any:
        """The CLIP encoder in ``slot`` on ``prompts``, with every hidden state (SDXL / SD3 read the penultimate)."""
        max_length = max_length or self.tokenizers[slot.replace("text_encoder", "tokenizer")].model_max_length
        return self.text_encoders[slot](self.ids(slot, prompts, max_length, device), output_hidden_states=True)

    def __call__(self, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        return self.family.encode_prompts(self, prompts, device)


class PipelineFamily:
    """The training-side description of one kind of diffusers pipeline (see the module docstring)."""

    name: str
    pipeline_class: str
    denoiser: str = "unet"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)
    max_sequence_length: int | None = None  # the pipeline's default T5 length, so training sees what inference gives
    resolution_multiple: int = 8
    float32_components: tuple[str, ...] = ()  # components kept in float32 whatever the mixed precision
    shared_conditioning: tuple[str, ...] = ()  # prompt outputs that are one tensor per batch, not one row per prompt
    load_kwargs: Mapping[str, Any] = {}

    def check_resolution(self, resolution: int) -> None:
        if resolution % self.resolution_multiple:
            raise TrainingError(f"--resolution must be a multiple of {self.resolution_multiple} for "
                                f"{self.pipeline_class}, got {resolution}.")

    def prompt_encoder(self, pipe: DiffusionPipeline, text_encoders: Mapping[str, nn.Module | None],
                       max_sequence_length: int | None = None, **options: Any) -> PromptEncoder:
        """The caption encoder for ``pipe``, running ``text_encoders`` (trained ones possibly DDP-wrapped);
        ``options`` are `PromptEncoder`'s SD-only ``tokenizer_max_length`` and ``use_attention_mask``."""
        tokenizers = {slot: getattr(pipe, slot) for slot in ("tokenizer", "tokenizer_2", "tokenizer_3")
                      if getattr(pipe, slot, None) is not None}
        return PromptEncoder(self, tokenizers, text_encoders, max_sequence_length, **options)

    def encode_prompts(self, encoder: PromptEncoder, prompts: Sequence[str], device: torch.device
                       ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_latents(self, vae: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE latents scaled the way the family's pipeline decodes them."""
        return self.scale_latents(vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.sample(), vae.config)

    def scale_latents(self, latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
        """A VAE sample scaled the way the family's pipeline decodes it (cached latents go through this too)."""
        return latents * vae_config.scaling_factor

    def image_conditioning(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning that comes from the images rather than the captions (none but for SDXL)."""
        return {}

    def noise_scheduler(self, pipe: DiffusionPipeline, settings: LossSettings) -> Any:
        raise NotImplementedError

    def loss(self, denoiser: nn.Module, scheduler: Any, latents: torch.Tensor,
             conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        """The per-sample training loss."""
        raise NotImplementedError


class StableDiffusionFamily(PipelineFamily):
    """SD 1.x / 2.x: one CLIP encoder, a UNet, DDPM epsilon or v-prediction."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    load_kwargs = {"safety_checker": None}

    def encode_prompts(self, encoder: PromptEncoder, prompts: Sequence[str], device: torch.device
                       ) -> dict[str, torch.Tensor]:
        text_encoder = encoder.text_encoders["text_encoder"]
        tokenizer = encoder.tokenizers["tokenizer"]
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                           max_length=encoder.tokenizer_max_length or tokenizer.model_max_length)
        use_mask = encoder.use_attention_mask or getattr(extract_model_from_parallel(text_encoder).config,
                                                         "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        return {"encoder_hidden_states": text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]}

    def noise_scheduler(self, pipe: DiffusionPipeline, settings: LossSettings) -> Any:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if settings.prediction_type is not None:
            scheduler.register_to_config(prediction_type=settings.prediction_type)
        return scheduler

    def loss(self, denoiser: nn.Module, scheduler: Any, latents: torch.Tensor,
             conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        """Per-sample DDPM loss (epsilon or v-prediction), min-SNR weighted with ``snr_gamma``."""
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
        prediction = denoiser(noisy, timesteps, conditioning["encoder_hidden_states"], return_dict=False,
                              **self.unet_kwargs(conditioning))[0]
        loss = _per_sample_mse(prediction, target)
        if settings.snr_gamma is not None:
            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=settings.snr_gamma)
            weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
            loss = loss * weights
        return loss

    def unet_kwargs(self, conditioning: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Extra UNet inputs beyond the text states (none for SD 1.x / 2.x)."""
        return {}


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP encoders (penultimate states + pooled), size / crop micro-conditioning, a float32 VAE."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    float32_components = ("vae",)  # SDXL's VAE overflows in fp16, as diffusers' SDXL script notes
    load_kwargs = {}

    def encode_prompts(self, encoder: PromptEncoder, prompts: Sequence[str], device: torch.device
                       ) -> dict[str, torch.Tensor]:
        outputs = [encoder.clip(slot, prompts, device) for slot in self.text_encoders]
        return {
            "encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in outputs], dim=-1),
            "pooled_projections": outputs[-1][0],
        }

    def image_conditioning(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning per image: original size, crop corner, target size (the bucket's)."""
        rows = [list(size) + list(crop) + list(target) for size, crop, target
                in zip(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True)]
        return {"time_ids": torch.tensor(rows, device=device, dtype=torch.float32)}

    def unet_kwargs(self, conditioning: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": conditioning["pooled_projections"],
                                      "time_ids": conditioning["time_ids"]}}


class FlowMatchingFamily(PipelineFamily):
    """Rectified-flow transformers: predict ``noise − latents`` at ``(1−σ) x + σ ε``; VAE latents are shifted."""

    denoiser = "transformer"

    def scale_latents(self, latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
        shift = getattr(vae_config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * vae_config.scaling_factor

    def noise_scheduler(self, pipe: DiffusionPipeline, settings: LossSettings) -> Any:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def loss(self, denoiser: nn.Module, scheduler: Any, latents: torch.Tensor,
             conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(settings.weighting_scheme, latents.shape[0], settings.logit_mean,
                                                  settings.logit_std, settings.mode_scale)
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.predict(denoiser, noisy, timesteps, conditioning, settings)
        weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)
        return _per_sample_mse(prediction, noise - latents, weighting)

    def predict(self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        """The transformer's velocity prediction, in the latents' layout."""
        raise NotImplementedError


class StableDiffusion3Family(FlowMatchingFamily):
    """SD3: two CLIP encoders and T5 (frozen: its saver has no slot), joint attention."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    max_sequence_length = 256

    def prompt_encoder(self, pipe: DiffusionPipeline, text_encoders: Mapping[str, nn.Module | None],
                       max_sequence_length: int | None = None, **options: Any) -> PromptEncoder:
        encoder = super().prompt_encoder(pipe, text_encoders, max_sequence_length, **options)
        encoder.joint_attention_dim = pipe.transformer.config.joint_attention_dim  # zeros stand in for no T5
        return encoder

    def encode_prompts(self, encoder: PromptEncoder, prompts: Sequence[str], device: torch.device
                       ) -> dict[str, torch.Tensor]:
        clip_length = encoder.tokenizers["tokenizer"].model_max_length  # the pipeline uses tokenizer 1's length
        outputs = [encoder.clip(slot, prompts, device, clip_length) for slot in ("text_encoder", "text_encoder_2")]
        clip_embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        if encoder.text_encoders.get("text_encoder_3") is None:
            t5 = torch.zeros(len(prompts), encoder.max_sequence_length, encoder.joint_attention_dim,
                             device=device, dtype=clip_embeds.dtype)
        else:
            ids = encoder.ids("text_encoder_3", prompts, encoder.max_sequence_length, device)
            t5 = encoder.text_encoders["text_encoder_3"](ids)[0]
        clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_embeds, t5.to(clip_embeds.dtype)], dim=-2),
            "pooled_projections": torch.cat([o[0] for o in outputs], dim=-1),
        }

    def predict(self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        return transformer(hidden_states=noisy, timestep=timesteps,
                           encoder_hidden_states=conditioning["encoder_hidden_states"],
                           pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's token layout: each 2×2 latent patch becomes one token, (B, C, H, W) → (B, H/2 · W/2, 4C).

    The same layout as `FluxPipeline`'s private ``_pack_latents`` (written out here rather than calling a
    private method).
    """
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of ``height × width``."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's positional ids of the packed image tokens: (0, row, column) per 2×2 patch."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)[:, None].expand(height // 2, width // 2)
    columns = torch.arange(width // 2, device=device, dtype=dtype)[None, :].expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class FluxFamily(FlowMatchingFamily):
    """Flux: pooled CLIP and T5 states, packed 2×2 latent tokens, a guidance embedding (dev)."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)
    shared_conditioning = ("txt_ids",)
    max_sequence_length = 512
    resolution_multiple = 16

    def encode_prompts(self, encoder: PromptEncoder, prompts: Sequence[str], device: torch.device
                       ) -> dict[str, torch.Tensor]:
        clip_ids = encoder.ids("text_encoder", prompts, encoder.tokenizers["tokenizer"].model_max_length, device)
        pooled = encoder.text_encoders["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
        t5_ids = encoder.ids("text_encoder_2", prompts, encoder.max_sequence_length, device)
        embeds = encoder.text_encoders["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
        return {
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
        }

    def predict(self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Mapping[str, torch.Tensor], settings: LossSettings) -> torch.Tensor:
        batch, _, height, width = noisy.shape
        guidance = None
        if extract_model_from_parallel(transformer).config.guidance_embeds:
            guidance = torch.full((batch,), settings.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        packed = transformer(hidden_states=pack_latents(noisy), timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=conditioning["pooled_projections"],
                             encoder_hidden_states=conditioning["encoder_hidden_states"],
                             txt_ids=conditioning["txt_ids"],
                             img_ids=latent_image_ids(height, width, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack_latents(packed, height, width)


FAMILIES: dict[str, PipelineFamily] = {
    family.pipeline_class: family
    for family in (StableDiffusionFamily(), StableDiffusionXLFamily(), StableDiffusion3Family(), FluxFamily())
}


def pipeline_family(model: str | Path, revision: str | None = None) -> PipelineFamily:
    """The family of a diffusers pipeline, read from its ``model_index.json`` (a local folder or a hub id)."""
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
    if name not in FAMILIES:
        raise TrainingError(
            f"--pretrained_model_name_or_path {model} is a {name}; supported: {', '.join(FAMILIES)}."
        )
    return FAMILIES[name]
