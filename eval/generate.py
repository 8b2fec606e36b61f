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
from stella_diffusion.evaluation.generation import generate_images, load_pipeline
from stella_diffusion.files import read_prompts

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", required=True, help="folder of a pipeline saved with save_pretrained")
    parser.add_argument("--adapter", help="LoRA export or native StelLA checkpoint folder")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line ('#' comments)")
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs and metadata.jsonl")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int)
    parser.add_argument("--guidance_scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--pipeline_kwargs", default="{}", help="JSON of further pipeline call arguments")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: the dtypes the pipeline was saved in"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the images the output folder already has, then write"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    call_args = ("num_inference_steps", "guidance_scale", "height", "width")
    kwargs = {name: getattr(args, name) for name in call_args if getattr(args, name) is not None}
    kwargs.update(json.loads(args.pipeline_kwargs))
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
