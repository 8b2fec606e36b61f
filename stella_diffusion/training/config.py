"""Arguments of the training script: ``--config FILE.yaml`` merged under the command line, and the input checks
that need neither a model nor data (each failure is one `TrainingError` line, before anything heavy starts).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class TrainingError(RuntimeError):
    """Bad input or a run that must stop; the script prints the message as one line and exits non-zero."""



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


# Flags whose ``module:callable`` values import and run code: a config file may not set those (a shared YAML file
# would otherwise run whatever it names); the command line, where the user types it, may.
CODE_LOADING_FLAGS = frozenset({"eval_feature_extractor"})


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
        if dest in CODE_LOADING_FLAGS and ":" in str(value):
            raise TrainingError(f"--config {source}: {key} {value!r} would import and run that module; a config "
                                f"file may not do that. Pass --{dest} on the command line if you trust it.")
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
    if not math.isfinite(width) or width <= 0:
        raise argparse.ArgumentTypeError(f"a reference width must be a positive number, got {value!r}")
    return width


# Flags that must be positive integers when given (None means "not set" for the optional ones).
_POSITIVE_INTEGERS = ("rank", "train_batch_size", "gradient_accumulation_steps", "resolution", "num_train_epochs",
                      "checkpointing_steps", "validation_epochs", "num_validation_images", "num_class_images",
                      "sample_batch_size", "max_train_steps", "checkpoints_total_limit", "num_inference_steps",
                      "max_sequence_length", "num_eval_images", "max_skipped_steps", "repeats",
                      "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "tokenizer_max_length")
_NON_NEGATIVE_INTEGERS = ("lr_warmup_steps", "dataloader_num_workers", "lr_num_cycles", "keep_tokens")
_FINITE_FLOATS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
                  "lora_alpha", "prior_loss_weight", "snr_gamma", "noise_offset", "logit_mean", "logit_std",
                  "mode_scale", "guidance_scale", "validation_guidance_scale", "lr_power",
                  "max_orthonormality_error", "text_encoder_lr", "caption_dropout_rate", "ema_decay")
_POSITIVE_FLOATS = ("learning_rate", "adam_epsilon", "max_grad_norm", "lora_alpha", "snr_gamma",
                    "max_orthonormality_error", "text_encoder_lr")
# optimizers from optional packages (--optimizer): the package each needs
_OPTIMIZER_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
# Trackers accelerate can log to, by the module each needs.
_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}


def check_args(args: argparse.Namespace) -> None:
    """The input checks that need no model or data; each failure is one `TrainingError` line."""
    if args.pretrained_model_name_or_path is None:
        raise TrainingError("--pretrained_model_name_or_path is required.")
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise TrainingError("Give one of --instance_data_dir (the DreamBooth images or a captioned image folder) and "
                            "--dataset_name (a datasets.load_dataset source).")
    for flag in _POSITIVE_INTEGERS:
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise TrainingError(f"--{flag} must be a positive integer, got {value}.")
    for flag in _NON_NEGATIVE_INTEGERS:
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise TrainingError(f"--{flag} must be zero or more, got {value}.")
    for flag in _FINITE_FLOATS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise TrainingError(f"--{flag} must be a finite number, got {value}.")
        if flag in _POSITIVE_FLOATS and value <= 0:
            raise TrainingError(f"--{flag} must be positive, got {value}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise TrainingError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise TrainingError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    if args.lora_layers is not None and not all(t.strip() for t in args.lora_layers.split(",")):
        raise TrainingError(f"--lora_layers {args.lora_layers!r} has an empty entry.")
    _check_feature_args(args)
    trackers = [] if args.report_to == "none" else list(_TRACKER_MODULES) if args.report_to == "all" else [
        args.report_to]
    for tracker in trackers:
        if tracker not in _TRACKER_MODULES:
            raise TrainingError(f"--report_to {tracker!r}: choose from {', '.join(_TRACKER_MODULES)}, all or none.")
        if args.report_to != "all" and importlib.util.find_spec(_TRACKER_MODULES[tracker]) is None:
            raise TrainingError(f"--report_to {tracker} needs the {tracker} package: `pip install {tracker}` "
                                "(or --report_to none).")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers`.")


def _check_feature_args(args: argparse.Namespace) -> None:
    """Checks of the data, caching, optimizer and EMA flags (``--use_8bit_adam`` becomes ``--optimizer adamw8bit``)."""
    if not 0.0 <= args.caption_dropout_rate <= 1.0:
        raise TrainingError(f"--caption_dropout_rate must be in [0, 1], got {args.caption_dropout_rate}.")
    if not 0.0 < args.ema_decay < 1.0:
        raise TrainingError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.use_8bit_adam:
        if args.optimizer not in ("adamw", "adamw8bit"):
            raise TrainingError(f"--use_8bit_adam (= --optimizer adamw8bit) contradicts --optimizer {args.optimizer}.")
        args.optimizer = "adamw8bit"
    package = _OPTIMIZER_PACKAGES.get(args.optimizer)
    if package is not None and importlib.util.find_spec(package) is None:
        raise TrainingError(f"--optimizer {args.optimizer} needs {package}: `pip install {package}`.")
    if args.lora_riemannian_preconditioner:
        if args.adapter == "stella":
            raise TrainingError("--lora_riemannian_preconditioner is for the peft baselines (lora, dora, pissa); "
                                "StelLA's optimizer is Riemannian already.")
        if args.optimizer not in ("adamw", "sgd") or args.text_encoder_lr is not None:
            raise TrainingError("--lora_riemannian_preconditioner builds one AdamW or SGD over all adapters: use "
                                "--optimizer adamw or sgd, without --text_encoder_lr.")
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        raise TrainingError("--pre_compute_text_embeddings needs frozen text encoders; drop --train_text_encoder.")
    if args.pre_compute_text_embeddings and args.shuffle_caption:
        raise TrainingError("--pre_compute_text_embeddings encodes each caption once; --shuffle_caption makes new "
                            "captions every epoch. Use one of them.")
    if args.aspect_ratio_buckets and args.with_prior_preservation:
        raise TrainingError("--aspect_ratio_buckets cannot be combined with --with_prior_preservation (class images "
                            "share each batch with the instance images, so they would need the same bucket).")


def check_output_dir(output_dir: str | Path) -> None:
    """Try writing into ``output_dir`` before any work starts, and leave nothing behind.

    Probes have unique names, and a missing ``output_dir`` is probed through a uniquely named stand-in for its
    first missing folder: every process of a multi-process run probes at the same moment, and none may remove a
    folder or file another is probing with.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file, not a folder.")
    missing = [p for p in [output_dir, *output_dir.parents] if not p.exists()]  # innermost first
    stand_in = None
    try:
        if missing:
            top = missing[-1]
            stand_in = Path(tempfile.mkdtemp(prefix=f".{top.name}.write-probe-", dir=top.parent))
            stand_in.joinpath(*output_dir.relative_to(top).parts).mkdir(parents=True, exist_ok=True)
        else:
            handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=output_dir)
            os.close(handle)
            os.unlink(probe)
    except OSError as err:
        raise TrainingError(f"--output_dir {output_dir} cannot be written: {err.strerror or err}.") from None
    finally:
        if stand_in is not None:
            shutil.rmtree(stand_in, ignore_errors=True)
