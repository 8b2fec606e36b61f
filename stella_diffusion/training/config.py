"""Arguments of the training script: ``--config FILE.yaml`` merged under the command line, and the input checks
that need neither a model nor data (each failure is one `TrainingError` line, before anything heavy starts).
"""

from __future__ import annotations

import argparse
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
