"""Generate images for FID from a saved pipeline, an optional adapter folder and a prompt file.

    python eval/generate.py --pipeline PIPE_DIR [--adapter ADAPTER_DIR] --prompts prompts.txt \
        --output_dir OUT_DIR [--num_images_per_prompt 4] [--seed 0] [--batch_size 4] \
        [--num_inference_steps 30] [--guidance_scale 7.5] [--height 512 --width 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json

import torch

from stella_diffusion.cli import ArgumentParser
from stella_diffusion.evaluation.cli import DTYPES, add_generation_arguments, generation_kwargs
from stella_diffusion.evaluation.generation import generate_images, load_pipeline
from stella_diffusion.files import read_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder of a pipeline saved with save_pretrained")
    parser.add_argument("--adapter", help="LoRA export or native StelLA checkpoint folder")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line ('#' comments)")
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs and metadata.jsonl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kwargs = generation_kwargs(args, json.loads(args.pipeline_kwargs))
    dtype = DTYPES[args.dtype] if args.dtype else None
    pipe = load_pipeline(args.pipeline, args.adapter, device=args.device, dtype=dtype)
    settings = {"pipeline": args.pipeline, "adapter": args.adapter, "dtype": args.dtype}
    records = generate_images(
        pipe,
        read_prompts(args.prompts),
        args.output_dir,
        num_images_per_prompt=args.num_images_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        generation_kwargs=kwargs,
        settings=settings,
        overwrite=args.overwrite,
    )
    print(f"Wrote {len(records)} images and metadata.jsonl to {args.output_dir}")


if __name__ == "__main__":
    main()
