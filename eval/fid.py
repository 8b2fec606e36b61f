"""FID / KID of a generated image folder against a reference folder or saved statistics (.npz).

    python eval/fid.py --generated GEN_DIR --reference REF_DIR [--save_stats ref.npz] [--output_dir runs]
    python eval/fid.py --generated GEN_DIR --reference ref.npz --name stella --output_dir runs   # runs/stella.json
    python eval/fid.py --reference REF_DIR --save_stats ref.npz          # statistics only, computed once

Features: torch-fidelity's FID Inception (--inception_weights, else the torch hub cache, downloaded there when
online), a named extractor (inception-torchscript, domain), or --feature_extractor module:callable, which imports
and runs that module (a module mapping uint8 N×3×S×S images to N×d features). Bad input: one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stella_diffusion.cli import ArgumentParser
from stella_diffusion.evaluation.features import InceptionWeightsNotFoundError, load_feature_extractor
from stella_diffusion.evaluation.metrics import StreamingFID, compute_fid
from stella_diffusion.files import write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generated", help="folder of generated images")
    parser.add_argument(
        "--reference", required=True, help="folder of reference images, or a .npz of statistics"
    )
    parser.add_argument("--save_stats", help="write the reference statistics to this .npz")
    parser.add_argument("--output_dir", help="write the record to OUTPUT_DIR/NAME.json (NAME: --name, else fid)")
    parser.add_argument("--name", help="run name in the result (e.g. stella, lora)")
    parser.add_argument(
        "--inception_weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
    )
    parser.add_argument(
        "--feature_extractor",
        help="inception-torchscript, domain, or module:callable giving an nn.Module (imports and runs that module)",
    )
    parser.add_argument("--image_size", type=int, default=299, help="image side (custom extractors only)")
    parser.add_argument("--kid_subset_size", type=int, default=1000)
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--kid_max_samples", type=int, default=2048, help="KID reservoir per set; 0: no KID")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.generated is None and args.save_stats is None:
        parser.error("give --generated, or --save_stats to only compute the reference statistics")
    if args.generated is None and args.reference.endswith(".npz"):
        parser.error("statistics only: --reference must be an image folder")
    for flag in ("image_size", "kid_subset_size", "kid_subsets", "batch_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.kid_max_samples < 0:
        parser.error(f"--kid_max_samples must be zero or more, got {args.kid_max_samples}")
    for flag in ("generated", "reference"):
        path = getattr(args, flag)
        if path is not None and not (Path(path).is_dir() or (path.endswith(".npz") and Path(path).is_file())):
            parser.error(f"--{flag} {path}: no such image folder" + (" or .npz file" if flag == "reference" else ""))
    return args


def compute(args: argparse.Namespace) -> dict:
    """The FID / KID record (or, without --generated, the reference statistics written to --save_stats)."""
    feature = load_feature_extractor(args.feature_extractor) if args.feature_extractor else None
    metric = StreamingFID(
        feature,
        inception_weights=args.inception_weights,
        feature_name=args.feature_extractor,
        image_size=getattr(feature, "image_size", args.image_size),
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        kid_max_samples=args.kid_max_samples,
        seed=args.seed,
    ).to(args.device)
    if args.generated is None:
        metric.update_folder(args.reference, real=True, batch_size=args.batch_size)
        stats = metric.reference_stats()
        stats.save(args.save_stats)
        print(f"Saved statistics of {stats.num_samples} images to {args.save_stats}")
        return {}
    result = compute_fid(args.generated, args.reference, metric, args.batch_size, args.save_stats)
    return {"name": args.name, **result} if args.name else result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        result = compute(args)
    except (InceptionWeightsNotFoundError, OSError, ValueError, TypeError, RuntimeError, ImportError,
            AttributeError) as err:  # each is bad input here (a folder, a file, an extractor): one line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"error: {message}") from None
    if result:
        text = json.dumps(result, indent=2)
        print(text)
        if args.output_dir:
            write_text_atomic(Path(args.output_dir, f"{args.name or 'fid'}.json"), text + "\n")
    return result


if __name__ == "__main__":
    main()
