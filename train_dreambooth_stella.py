#!/usr/bin/env python
"""DreamBooth and captioned fine-tuning of a diffusers pipeline with StelLA, in the shape of diffusers'
``examples/dreambooth/train_dreambooth_lora.py``: same flags, ``accelerate launch`` for one or many GPUs, same
outputs. ``--adapter lora|dora|pissa`` trains peft's baselines through the same script, for comparisons.

    accelerate launch train_dreambooth_stella.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir stella-dog \\
      --resolution 512 --train_batch_size 1 --learning_rate 8e-4 --max_train_steps 500 --seed 0
    python train_dreambooth_stella.py --config configs/sd15-style-stella.yaml --instance_data_dir style/

SD 1.x/2.x and SDXL (UNet, DDPM loss) and SD3 and Flux (transformer, flow matching) are told apart by the model
folder's ``model_index.json`` (``stella_diffusion.training.families``). The helpers live in
``stella_diffusion.training``; the one StelLA-specific call is `make_riemannian` on the optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.optimization import get_scheduler
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from stella_diffusion import RETRACTIONS, make_riemannian
from stella_diffusion.cli import ArgumentParser
from stella_diffusion.evaluation.comparison import EvaluationError, evaluate_against_base, evaluation_setup
from stella_diffusion.integrations.diffusers import LORA_WEIGHT_NAME
from stella_diffusion.integrations.lora_formats import FORMATS, save_lora_formats
from stella_diffusion.training import (
    adapters,
    buckets,
    caching,
    checkpoints,
    config,
    data,
    families,
    model_setup,
    optimizers,
    outputs,
    records,
)
from stella_diffusion.training.config import TrainingError
from stella_diffusion.training.ema import AdapterEMA
from stella_diffusion.training.families import prior_preservation_loss
from stella_diffusion.tuner.config import INIT_METHODS

logger = get_logger(__name__)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """diffusers' flags (same names and meanings), StelLA's, and ``--config FILE.yaml`` for defaults."""
    parser = ArgumentParser(description="DreamBooth / captioned fine-tuning with StelLA (or peft LoRA).")
    flag = parser.add_argument
    switch = partial(parser.add_argument, action=argparse.BooleanOptionalAction, default=False)
    flag("--config", type=str, default=None,
         help="YAML file of flag values (keys = flag names); flags given on the command line override it.")
    # model
    flag("--pretrained_model_name_or_path", type=str, default=None,
         help="Path to a diffusers pipeline folder or a model id on huggingface.co (SD 1.x/2.x, SDXL, SD3, Flux).")
    flag("--revision", type=str, default=None, help="Revision of the pretrained model on huggingface.co.")
    flag("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    flag("--pretrained_vae_model_name_or_path", type=str, default=None,
         help="A VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix).")
    flag("--tokenizer_max_length", type=int, default=None,
         help="SD 1.x/2.x: the tokenizer's max length (default: the tokenizer's own).")
    switch("--text_encoder_use_attention_mask", help="SD 1.x/2.x: pass the attention mask to the text encoder.")
    # data
    flag("--instance_data_dir", type=str, default=None,
         help="Folder of instance images (DreamBooth) or an image folder with metadata.jsonl (captioned).")
    flag("--instance_prompt", type=str, default=None,
         help="The prompt with the identifier of the instance, e.g. 'a photo of sks dog' (DreamBooth mode).")
    flag("--caption_column", type=str, default=None,
         help="Captioned mode: the metadata.jsonl column that holds each image's caption (default 'text' when the "
              "folder has a metadata.jsonl and no --instance_prompt is given).")
    flag("--dataset_name", type=str, default=None,
         help="Instead of --instance_data_dir: a dataset datasets.load_dataset reads (a hub id or a local folder, "
              "e.g. an imagefolder); its 'train' split is used.")
    flag("--dataset_config_name", type=str, default=None, help="The config of --dataset_name, if it has several.")
    flag("--image_column", type=str, default="image", help="--dataset_name: the column holding the images.")
    flag("--repeats", type=int, default=1, help="How many times each instance image is seen per epoch.")
    flag("--caption_dropout_rate", type=float, default=0.0,
         help="Probability of training an image on the empty prompt (keeps classifier-free guidance working).")
    switch("--shuffle_caption", help="Shuffle the comma-separated tags of each caption (kohya).")
    flag("--keep_tokens", type=int, default=0, help="--shuffle_caption leaves the first N tags in place.")
    flag("--validation_split", type=str, default=None,
         help="A fraction of the training images (e.g. 0.1) or a folder held out for a validation loss, computed "
              "every --validation_epochs with fixed noise and timesteps.")
    flag("--class_data_dir", type=str, default=None, help="Folder of class images for prior preservation.")
    flag("--class_prompt", type=str, default=None, help="The prompt of the class images.")
    switch("--with_prior_preservation", help="Add the prior preservation loss on class images.")
    flag("--prior_loss_weight", type=float, default=1.0, help="The weight of the prior preservation loss.")
    flag("--num_class_images", type=int, default=100,
         help="Minimal number of class images; missing ones are generated with the base model and --class_prompt.")
    flag("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
         help="Precision of class-image generation (default fp16 on a GPU, else fp32).")
    flag("--sample_batch_size", type=int, default=4, help="Batch size (per device) for generating class images.")
    flag("--resolution", type=int, default=512, help="Training resolution: images are resized and cropped to it.")
    switch("--center_crop", help="Center crop to the resolution (default: random crop).")
    switch("--random_flip", help="Randomly flip images horizontally.")
    flag("--aspect_ratio_buckets", "--enable_bucket", action=argparse.BooleanOptionalAction, default=False,
         help="Train each image at the bucket closest to its aspect ratio (area about --resolution²), one bucket "
              "per batch.")
    flag("--min_bucket_reso", type=int, default=None, help="Smallest bucket side (default: --resolution / 2).")
    flag("--max_bucket_reso", type=int, default=None, help="Largest bucket side (default: 2 x --resolution).")
    flag("--bucket_reso_steps", type=int, default=None,
         help="Bucket sides are multiples of this (default: 64 from 512 px, else the pipeline's multiple).")
    switch("--cache_latents", help="Encode every training crop with the VAE once before training; the VAE then "
                                   "leaves the device until validation images need it.")
    switch("--pre_compute_text_embeddings",
           help="Encode every prompt once before training (text encoders not trained); they then leave the device.")
    flag("--cache_dir", type=str, default=None,
         help="Keep cached latents and text embeddings here (safetensors), reused by runs with the same model, "
              "data, resolution and augmentation.")
    flag("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0: the main process).")
    # validation
    flag("--validation_prompt", type=str, default=None, help="Prompt of the validation images.")
    flag("--num_validation_images", type=int, default=4, help="Number of validation images per validation.")
    flag("--validation_epochs", type=int, default=50, help="Run validation every X epochs.")
    flag("--num_inference_steps", type=int, default=None,
         help="Denoising steps for validation, evaluation and class images (default: the pipeline's).")
    flag("--validation_guidance_scale", type=float, default=None,
         help="Classifier-free guidance of validation and evaluation images (default: the pipeline's).")
    # evaluation after training
    flag("--eval_reference_dir", type=str, default=None,
         help="After training, generate with the base and the fine-tuned model on the same prompts and seeds and "
              "write eval/report.{json,md,png}: FID / KID against this folder of reference images (or a .npz "
              "of statistics from eval/fid.py). Off when unset.")
    flag("--eval_prompts", type=str, default=None,
         help="Evaluation prompts: a .txt (one per line) or a .jsonl ('text' column; the other string columns are "
              "attributes the prompt asks for), cycled to --num_eval_images (default: the instance prompt, else "
              "--validation_prompt).")
    flag("--num_eval_images", type=int, default=64, help="Images per evaluated model.")
    flag("--eval_feature_extractor", type=str, default="inception",
         help="FID features: inception (torch-fidelity's FID Inception, from the torch hub cache), domain (the "
              "shapes classifier shipped with the package, which also scores the prompted attributes) or "
              "module:callable, which IMPORTS AND RUNS that module (accepted on the command line only, never from "
              "a --config file).")
    flag("--eval_clip_model", type=str, default=None,
         help="A CLIP model (hub id or local folder): adds CLIP-T (image-prompt CLIP score) and CMMD to the report.")
    flag("--eval_drift_prompts", type=str, default=None,
         help="A .txt of prompts unrelated to the fine-tune: adds the drift from the base on them (same seeds).")
    flag("--eval_base", action=argparse.BooleanOptionalAction, default=True,
         help="Also score the base model (--no-eval_base skips it, e.g. in sweeps that score it once).")
    # adapter
    flag("--adapter", type=str, default="stella", choices=list(adapters.ADAPTERS),
         help="stella, or a peft baseline (lora, dora, pissa) trained the same way for comparisons.")
    flag("--rank", type=int, default=4, help="The rank of the adapter.")
    flag("--lora_alpha", type=float, default=None, help="The scale numerator: scale = alpha / rank (default: rank).")
    flag("--lora_dropout", type=float, default=0.0, help="Dropout on the adapter's input.")
    flag("--lora_layers", type=str, default=None,
         help="Comma-separated denoiser modules to adapt, e.g. 'to_q,to_k,to_v,to_out.0' (default: the attention "
              "projections of the model class, stella_diffusion.integrations.diffusers.TARGET_PRESETS).")
    switch("--train_text_encoder", help="Also adapt the CLIP text encoder(s).")
    flag("--stella_retraction", type=str, default="polar", choices=RETRACTIONS,
         help="StelLA: the retraction that keeps U and V orthonormal.")
    flag("--stella_init", type=str, default="orthonormal", choices=INIT_METHODS,
         help="StelLA: random orthonormal U, V (the paper's default), the top / bottom singular vectors of W, or "
              "zero (orthonormal U, V with S = 0: the model starts as the base).")
    switch("--stella_diag_s", help="StelLA: a diagonal S (r values) instead of a full r x r matrix.")
    switch("--stella_function_preserving",
           help="StelLA: subtract the start U0 S0 V0^T (kept as frozen buffers), so training starts from the base "
                "model's outputs; the export is then a LoRA of rank up to 2r.")
    flag("--stella_grad_scaling", type=config.bool_or_float, default=True,
         help="StelLA: divide U/V steps by sqrt(n / c); true: c = hidden size, a number: c, false: off.")
    # loss
    flag("--snr_gamma", type=float, default=None,
         help="UNet pipelines: min-SNR weighting gamma (5.0 is recommended); off by default.")
    flag("--noise_offset", type=float, default=0.0, help="UNet pipelines: the scale of the noise offset.")
    flag("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
         help="UNet pipelines: the training target (default: the scheduler's).")
    flag("--weighting_scheme", type=str, default="none",
         choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
         help="SD3 / Flux: timestep density and loss weighting of flow matching.")
    flag("--logit_mean", type=float, default=0.0, help="SD3 / Flux: mean of the logit_normal scheme.")
    flag("--logit_std", type=float, default=1.0, help="SD3 / Flux: std of the logit_normal scheme.")
    flag("--mode_scale", type=float, default=1.29, help="SD3 / Flux: scale of the mode scheme.")
    flag("--guidance_scale", type=float, default=3.5, help="Flux: the guidance embedding value during training.")
    flag("--max_sequence_length", type=int, default=None,
         help="SD3 / Flux: T5 prompt length (default: the pipeline's, 256 / 512).")
    # optimisation
    flag("--output_dir", type=str, default="stella-dreambooth-model",
         help="Where checkpoints, the exported LoRA, logs, images and the model card are written.")
    flag("--export_format", type=str, action="append", choices=FORMATS, default=None,
         help="LoRA file layout, repeatable: diffusers (pytorch_lora_weights.safetensors: diffusers' "
              "load_lora_weights), kohya (..._kohya.safetensors: ComfyUI, A1111 / Forge, kohya tools), bfl (Flux "
              "only, ..._bfl.safetensors). Default: diffusers and kohya where the pipeline has both.")
    flag("--seed", type=int, default=None, help="A seed for reproducible training.")
    flag("--train_batch_size", type=int, default=4, help="Batch size (per device) for training.")
    flag("--num_train_epochs", type=int, default=1)
    flag("--max_train_steps", type=int, default=None,
         help="Total number of optimizer steps; overrides --num_train_epochs.")
    flag("--checkpointing_steps", type=int, default=500,
         help="Save a resumable checkpoint (accelerator.save_state) every X steps.")
    flag("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to keep.")
    flag("--resume_from_checkpoint", type=str, default=None,
         help="A checkpoint folder (or its name in --output_dir), or 'latest'.")
    flag("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    switch("--gradient_checkpointing", help="Trade compute for memory in the backward pass.")
    flag("--learning_rate", type=float, default=5e-4, help="Learning rate after warm-up (the paper: 8e-4 for StelLA).")
    switch("--scale_lr", help="Multiply the learning rate by GPUs x accumulation steps x batch size.")
    flag("--lr_scheduler", type=str, default="constant",
         choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    flag("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning-rate schedule.")
    flag("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    flag("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    flag("--optimizer", type=str, default="adamw", choices=optimizers.OPTIMIZERS,
         help="adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt; use --learning_rate 1.0), adafactor "
              "(transformers', fixed learning rate) or sgd; StelLA makes any of them Riemannian.")
    switch("--use_8bit_adam", help="Alias of --optimizer adamw8bit.")
    switch("--lora_riemannian_preconditioner",
           help="LoRA / DoRA / PiSSA: build the optimizer with peft's create_riemannian_optimizer (r x r "
                "Riemannian-preconditioned LoRA gradients, Zhang & Pilanci 2024); --optimizer adamw or sgd.")
    flag("--text_encoder_lr", type=float, default=None,
         help="Learning rate of the text-encoder adapters (default: --learning_rate).")
    switch("--use_ema", help="Keep an EMA of the adapter (U and V retracted onto the manifold) and export it.")
    flag("--ema_decay", type=float, default=0.9999, help="The EMA's decay (warmed up as (1 + t) / (10 + t)).")
    flag("--adam_beta1", type=float, default=0.9)
    flag("--adam_beta2", type=float, default=0.999)
    flag("--adam_weight_decay", type=float, default=1e-2, help="Weight decay (never applied to StelLA's U and V).")
    flag("--adam_epsilon", type=float, default=1e-08)
    flag("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    flag("--max_skipped_steps", type=int, default=8,
         help="Stop the run after more than this many optimizer steps in a row skipped for non-finite gradients.")
    flag("--max_orthonormality_error", type=float, default=1e-3,
         help="StelLA: stop the run when max|UᵀU − I| exceeds this after a step (U, V have left the manifold).")
    # system
    flag("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    flag("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml, all or none.")
    flag("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
         help="Overrides the accelerate config; trainable parameters stay float32 in every case.")
    switch("--allow_tf32", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    switch("--enable_xformers_memory_efficient_attention", help="Use xformers attention in the denoiser.")
    return config.parse_args_with_config(parser, input_args)


def validation_kwargs(args: argparse.Namespace) -> dict:
    """Pipeline call settings shared by validation and evaluation images."""
    kwargs = {"height": args.resolution, "width": args.resolution}
    if args.num_inference_steps is not None:
        kwargs["num_inference_steps"] = args.num_inference_steps
    if args.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = args.validation_guidance_scale
    return kwargs


def log_validation(
    pipeline: DiffusionPipeline, args: argparse.Namespace, accelerator: Accelerator, step: int, phase: str
) -> list[Image.Image]:
    """Generate ``--num_validation_images``, save them as one PNG row and log them to the trackers."""
    logger.info(f"Running {phase}: {args.num_validation_images} images of {args.validation_prompt!r}.")
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with torch.no_grad(), accelerator.autocast():
        images = [pipeline(args.validation_prompt, generator=generator, **validation_kwargs(args)).images[0]
                  for _ in range(args.num_validation_images)]
    outputs.save_image_row(images, Path(args.output_dir, "validation", f"{phase}-step-{step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


@torch.no_grad()
def validation_loss(loader: torch.utils.data.DataLoader, batch_loss: Callable[[dict], torch.Tensor], seed: int,
                    device: torch.device) -> float:
    """Mean loss over the held-out images, with the same noise and timesteps at every validation."""
    losses = []
    for index, batch in enumerate(loader):
        with families.step_rng(records.derived_seed(seed, records.VALIDATION_SEED_KEY, index), device):
            losses.append(batch_loss(batch).float())
    return float(torch.cat(losses).mean())


def main(args: argparse.Namespace) -> None:
    # Every input check runs before anything heavy, so bad input fails in a second with one line.
    config.check_args(args)
    family = families.pipeline_family(args.pretrained_model_name_or_path, args.revision)
    family.check_resolution(args.resolution)
    if family.name != "sd" and (args.tokenizer_max_length or args.text_encoder_use_attention_mask):
        raise TrainingError("--tokenizer_max_length and --text_encoder_use_attention_mask are for SD 1.x/2.x.")
    instance_records = records.training_records(args)
    adapter = adapters.make_adapter(adapters.AdapterSettings.from_args(args))
    trained_names = model_setup.adapted_components(args.pretrained_model_name_or_path, args.revision, family,
                                                   args.train_text_encoder, adapter)
    export_formats = adapter.choose_export_formats(getattr(diffusers, family.pipeline_class), args.export_format)
    resume_dir = checkpoints.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_dir is not None:
        checkpoints.check_resume_compatible(resume_dir, adapter)
    config.check_output_dir(args.output_dir)
    if args.seed is None:
        args.seed = random.randrange(2**31)
    instance_records, validation_records = records.split_validation(instance_records, args)
    bucket_sizes = None
    if args.aspect_ratio_buckets:
        settings = buckets.bucket_settings(args, family.resolution_multiple)
        bucket_sizes = buckets.bucket_resolutions(args.resolution, *settings)

    accelerator = Accelerator(
        # adapters whose output a family never reads (the last CLIP layer under SDXL's penultimate-layer
        # conditioning) get no gradient; DDP must expect that, as in diffusers' SDXL script
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir, args.logging_dir))),
    )
    evaluation = evaluation_setup(args) if accelerator.is_main_process else None
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    load_kwargs = {"revision": args.revision, "variant": args.variant, **family.load_kwargs}

    def vae_override(dtype: torch.dtype) -> dict:
        if args.pretrained_vae_model_name_or_path is None:
            return {}
        return {"vae": AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype)}

    # Class images for prior preservation: generated with the base model when there are too few.
    class_records = None
    if args.with_prior_preservation:
        precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
        dtype = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        data.generate_class_images(args.pretrained_model_name_or_path, args.class_data_dir, args.class_prompt,
                                   args.num_class_images, accelerator=accelerator, batch_size=args.sample_batch_size,
                                   seed=args.seed, torch_dtype=dtype,
                                   load_kwargs={**load_kwargs, **vae_override(dtype)},
                                   generation_kwargs=validation_kwargs(args))
        class_records = records.dreambooth_records(args.class_data_dir, args.class_prompt, "--class_data_dir")
        class_records = class_records[: args.num_class_images]
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # The pipeline in float32: adapters are added (and initialised, e.g. by an SVD) before any cast.
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=torch.float32,
                                             **load_kwargs, **vae_override(torch.float32))
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
    for module in modules.values():
        module.requires_grad_(False)
    for name in trained_names:
        adapter.add_to(name, modules[name])
    components = {name: modules[name] for name in trained_names}  # unwrapped: what the hooks save and export

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name, module in modules.items():
        dtype = torch.float32 if name in family.float32_components else weight_dtype
        model_setup.cast_frozen_parameters(module, dtype)
    pipe.to(accelerator.device)
    denoiser = components[family.denoiser]
    if args.enable_xformers_memory_efficient_attention:
        model_setup.enable_xformers(denoiser)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained_names[1:]:
            components[name].gradient_checkpointing_enable()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Checkpoints hold the adapter only (native StelLA factors or the peft state dict), its EMA with --use_ema
    # (ema_adapter.safetensors) and the history as JSON, not the frozen model; nothing in them is ever unpickled.
    history = checkpoints.TrainingHistory()
    trained_modules = list(components.values())
    ema = AdapterEMA(trained_modules, args.ema_decay) if args.use_ema else None

    def save_model_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            adapter.save(output_dir, components)
            history.save(Path(output_dir, checkpoints.HISTORY_NAME))
            if ema is not None:
                ema.save(output_dir)
        weights.clear()

    def load_model_hook(models: list[nn.Module], input_dir: str) -> None:
        models.clear()
        adapter.load(input_dir, components)
        history.load(Path(input_dir, checkpoints.HISTORY_NAME))
        if ema is not None and not ema.load(input_dir):
            logger.warning(f"{input_dir} has no EMA of the adapter; the EMA restarts from the resumed weights.")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        args.text_encoder_lr = args.text_encoder_lr and args.text_encoder_lr * factor
    # --optimizer over one group per component and kind: U and V without weight decay, text encoders at their lr
    optimizer = optimizers.build_optimizer(components, family.denoiser, args)
    riemannian = None
    if args.adapter == "stella":
        # The StelLA step: before each optimizer step the U/V gradients become Riemannian; after it the change
        # is scaled, projected and retracted, so U and V stay orthonormal.
        riemannian = make_riemannian(optimizer, trained_modules, retraction=args.stella_retraction,
                                     grad_scaling=args.stella_grad_scaling)

    # Aspect-ratio buckets: each image at the bucket nearest its shape, each batch from one bucket.
    bucket_of = partial(buckets.nearest_bucket, buckets=bucket_sizes) if bucket_sizes else None
    captions = data.CaptionSettings(args.caption_dropout_rate, args.shuffle_caption, args.keep_tokens)
    train_dataset = data.DreamBoothDataset(instance_records, class_records, size=args.resolution,
                                           center_crop=args.center_crop, random_flip=args.random_flip,
                                           seed=args.seed, bucket_of=bucket_of, captions=captions,
                                           repeats=args.repeats)

    def loader(dataset: data.DreamBoothDataset, shuffle: bool, prior: bool) -> torch.utils.data.DataLoader:
        if args.aspect_ratio_buckets:
            order = {"batch_sampler": buckets.BucketBatchSampler(dataset.item_buckets(), args.train_batch_size,
                                                                 args.seed, shuffle=shuffle)}
        else:
            order = {"batch_size": args.train_batch_size,
                     "sampler": data.EpochShuffleSampler(len(dataset), args.seed) if shuffle else None}
        return torch.utils.data.DataLoader(
            dataset, **order, num_workers=args.dataloader_num_workers,
            collate_fn=partial(data.collate_fn, with_prior_preservation=prior))

    train_dataloader = loader(train_dataset, shuffle=True, prior=args.with_prior_preservation)
    # --validation_split: held-out images, centre-cropped, never flipped, scored every --validation_epochs
    validation_dataset = validation_dataloader = None
    if validation_records:
        validation_dataset = data.DreamBoothDataset(validation_records, size=args.resolution, center_crop=True,
                                                    seed=args.seed, bucket_of=bucket_of)
        validation_dataloader = loader(validation_dataset, shuffle=False, prior=False)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    prepared = accelerator.prepare(*components.values(), optimizer, train_dataloader, lr_scheduler)
    *trained_models, optimizer, train_dataloader, lr_scheduler = prepared
    trained = dict(zip(components, trained_models, strict=True))  # possibly DDP-wrapped
    trained_params = [p for m in trained_modules for p in m.parameters() if p.requires_grad]
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    text_encoders = {slot: trained.get(slot, getattr(pipe, slot, None)) for slot in family.text_encoders}
    encode_prompts = family.prompt_encoder(pipe, text_encoders, args.max_sequence_length,
                                           tokenizer_max_length=args.tokenizer_max_length,
                                           use_attention_mask=args.text_encoder_use_attention_mask)

    # --cache_latents / --pre_compute_text_embeddings: the frozen VAE and text encoders run once, then leave the
    # device (validation images bring them back for a while). Cached latents are the VAE's distributions, sampled
    # at each step under the step's seed as the VAE would: the same losses as without caching.
    offloaded: list[nn.Module] = []
    channels_last = False  # the layout of the VAE's output, which cached latents reproduce
    if args.cache_latents:
        channels_last = caching.cache_latents(
            [d for d in (train_dataset, validation_dataset) if d is not None], pipe.vae,
            batch_size=args.train_batch_size, cache_dir=args.cache_dir, key_fields=caching.latent_key_fields(args))
        offloaded.append(pipe.vae)
    if args.pre_compute_text_embeddings:
        prompts = {r.prompt for r in [*instance_records, *validation_records, *(class_records or [])]}
        encode_prompts = caching.cache_text_embeddings(
            prompts | ({""} if args.caption_dropout_rate else set()), encode_prompts, accelerator.device,
            shared_keys=family.shared_conditioning, batch_size=args.train_batch_size, cache_dir=args.cache_dir,
            key_fields=caching.text_key_fields(args, family.name, family.text_encoders, weight_dtype))
        offloaded += [m for m in text_encoders.values() if m is not None]
    caching.offload(offloaded)
    loss_settings = families.LossSettings(
        snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, prediction_type=args.prediction_type,
        weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
        mode_scale=args.mode_scale, guidance_scale=args.guidance_scale,
    )
    noise_scheduler = family.noise_scheduler(pipe, loss_settings)
    vae_config = pipe.vae.config

    def batch_loss(batch: dict) -> torch.Tensor:
        """The per-sample loss of a batch: latents (encoded now, or drawn from the cache), conditioning, loss."""
        with torch.no_grad():
            if "latent_parameters" in batch:
                sample = caching.sample_latents(batch["latent_parameters"].to(accelerator.device), channels_last)
                latents = family.scale_latents(sample, vae_config).to(weight_dtype)
            else:
                latents = family.encode_latents(pipe.vae, batch["pixel_values"]).to(weight_dtype)
        with torch.set_grad_enabled(args.train_text_encoder and torch.is_grad_enabled()):
            conditioning = encode_prompts(batch["prompts"], accelerator.device)
        conditioning.update(family.image_conditioning(batch, accelerator.device))
        return family.loss(trained[family.denoiser], noise_scheduler, latents, conditioning, loss_settings)

    if accelerator.is_main_process:
        tracker_config = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("dreambooth-stella", config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Pipeline family = {family.name}, adapter = {args.adapter}, trained = {', '.join(trained_names)}")
    logger.info(f"  Num examples = {len(train_dataset)} "
                f"({'captioned' if records.is_captioned(args) else 'DreamBooth'})")
    logger.info(f"  Num epochs = {args.num_train_epochs}, total optimization steps = {args.max_train_steps}")
    logger.info(f"  Total train batch size (parallel, distributed & accumulation) = {total_batch_size}")

    global_step = 0
    first_epoch = 0
    resume_batches = 0
    if args.resume_from_checkpoint and resume_dir is None:
        accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    if resume_dir is not None:
        accelerator.print(f"Resuming from checkpoint {resume_dir}")
        accelerator.load_state(str(resume_dir))
        global_step = checkpoints.checkpoint_step(resume_dir)
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    micro_losses: list[float] = []
    skipped_in_a_row = 0
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            for model in trained.values():
                model.train()
            train_dataset.set_epoch(epoch)
            train_dataloader.set_epoch(epoch)
            skip = resume_batches if epoch == first_epoch else 0
            batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            for batch_index, batch in enumerate(batches, start=skip):
                if global_step >= args.max_train_steps:  # checked first: a resume may start at the end
                    break
                seed = records.derived_seed(args.seed, epoch, batch_index, accelerator.process_index)
                with accelerator.accumulate(*trained.values()), families.step_rng(seed, accelerator.device):
                    per_sample = batch_loss(batch)
                    loss = prior_preservation_loss(per_sample, args.with_prior_preservation, args.prior_loss_weight)
                    loss_value = accelerator.gather(loss.detach().reshape(1)).mean().item()
                    checkpoints.check_finite_loss(loss_value, global_step + 1, args.output_dir)
                    micro_losses.append(loss_value)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trained_params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                progress_bar.update(1)
                global_step += 1
                if ema is not None:
                    ema.step()
                skipped = bool(riemannian and riemannian.last_step_skipped)
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                record = {"step": global_step, "epoch": epoch, "loss": float(np.mean(micro_losses)),
                          "lr": lr_scheduler.get_last_lr()[0], "skipped": skipped,
                          "skipped_steps": riemannian.skipped_steps if riemannian else 0,
                          "orthonormality_error": riemannian.orthonormality_error() if riemannian else None}
                micro_losses.clear()
                history.append(**record)
                accelerator.log({k: float(v) for k, v in record.items() if v is not None and k != "step"},
                                step=global_step)
                progress_bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                         skipped=record["skipped_steps"])
                if global_step % args.checkpointing_steps == 0:
                    healthy = checkpoints.is_healthy(record, trained_params, args.max_orthonormality_error)
                    checkpoints.save_checkpoint_on_main(accelerator, args.output_dir, global_step, record,
                                                        healthy=healthy, total_limit=args.checkpoints_total_limit)
                checkpoints.check_divergence(record, skipped_in_a_row, args.max_skipped_steps,
                                             args.max_orthonormality_error, args.output_dir)

            if epoch % args.validation_epochs == 0:
                for model in trained.values():
                    model.eval()
                if validation_dataloader is not None and history.records:  # on every process: DDP forwards
                    value = validation_loss(validation_dataloader, batch_loss, args.seed, accelerator.device)
                    history.records[-1]["validation_loss"] = value
                    accelerator.log({"validation_loss": value}, step=global_step)
                    logger.info(f"Validation loss after epoch {epoch}: {value:.5f}")
                if accelerator.is_main_process and args.validation_prompt:
                    with caching.onloaded(offloaded, accelerator.device):
                        log_validation(pipe, args, accelerator, global_step, "validation")
    except TrainingError:
        accelerator.end_training()
        raise
    finally:
        progress_bar.close()
        if accelerator.is_main_process:
            history.save(Path(args.output_dir, checkpoints.HISTORY_NAME))
            if history.records:
                outputs.plot_training_curves(history.records, Path(args.output_dir, outputs.PLOT_NAME))

    # The final export: a plain LoRA file a stock pipeline loads, the resumable adapter, images and the card.
    model_setup.check_identical_across_processes(accelerator, trained_params)
    # A barrier, not the digest's gather, is the last collective: while it waits, gloo's worker threads free the
    # gather's tensors (which needs the GIL). Otherwise a process that ends at once can deadlock tearing down the
    # process group (seen with torch 2.6: ~ProcessGroupGloo joins a thread that waits for the GIL).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # with --use_ema the exports and the adapter file hold the EMA weights (the checkpoints keep the trained ones)
        with ema.applied() if ema is not None else contextlib.nullcontext():
            exports = save_lora_formats(args.output_dir, type(pipe), adapter.lora_states(components),
                                        export_formats, training_metadata=outputs.kohya_training_metadata(args))
            adapter.save(args.output_dir, components)
        logger.info(f"Saved {', '.join(str(p) for p in exports.values())}" + (" (EMA weights)" if ema else ""))
        images, report = [], None
        validates = bool(args.validation_prompt and args.num_validation_images > 0)
        if validates or evaluation is not None:
            # the export in a freshly loaded base pipeline, exactly as a user loads it
            del pipe
            final = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=weight_dtype,
                                                      **load_kwargs, **vae_override(weight_dtype))
            final.load_lora_weights(args.output_dir, weight_name=LORA_WEIGHT_NAME)
            final.to(accelerator.device)
            if validates:
                images = log_validation(final, args, accelerator, global_step, "test")
            if evaluation is not None:
                logger.info(f"Evaluating on {len(evaluation.prompts)} prompts against {args.eval_reference_dir}.")
                with accelerator.autocast():
                    paths = evaluate_against_base(
                        final, args.adapter, evaluation.prompts, Path(args.output_dir, outputs.EVAL_DIR),
                        args.eval_reference_dir, evaluation.metric.to(accelerator.device),
                        include_base=args.eval_base, scorer=evaluation.scorer,
                        drift_prompts=evaluation.drift_prompts, seed=args.seed, batch_size=args.sample_batch_size,
                        generation_kwargs=validation_kwargs(args),
                    )
                report = paths["markdown"].read_text(encoding="utf-8")
                logger.info("\n" + report)
        outputs.write_model_card(
            args.output_dir, base_model=args.pretrained_model_name_or_path, family=family.name, adapter=adapter,
            prompt=None if records.is_captioned(args) else args.instance_prompt,
            validation_prompt=args.validation_prompt, images=images,
            settings={"adapter": args.adapter, "rank": args.rank, "lora_alpha": adapter.settings.scale_alpha,
                      "trained": ", ".join(trained_names), "optimizer": args.optimizer,
                      "learning_rate": args.learning_rate, **({"EMA decay": args.ema_decay} if ema else {}),
                      "lr_scheduler": args.lr_scheduler, "steps": global_step, "batch size": total_batch_size,
                      "resolution": args.resolution, "mixed precision": accelerator.mixed_precision,
                      "seed": args.seed, "prior preservation": args.with_prior_preservation},
            evaluation=report,
        )
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainingError, EvaluationError) as err:
        sys.exit(f"error: {err}")
