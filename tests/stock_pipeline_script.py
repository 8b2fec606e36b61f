"""Run in a separate process by the tests: a STOCK diffusers pipeline loads a LoRA export.

It never imports `stella_diffusion`, exactly as a user without the package would load the file, and it writes
the images of every stage (base, loaded, weight 0, unloaded, fused) to an ``.npz`` file.
"""

import argparse
import json
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # named: diffusers < 0.42.1 needs it offline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_threads", type=int, required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generation_kwargs", default="{}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    kwargs = json.loads(args.generation_kwargs)
    torch.set_num_threads(args.num_threads)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        return np.asarray(pipe(args.prompt, generator=generator, **kwargs).images)

    images = {"base": generate()}
    pipe.load_lora_weights(args.lora, weight_name=WEIGHT_NAME, adapter_name="stella")
    images["loaded"] = generate()
    pipe.set_adapters(["stella"], adapter_weights=[0.0])
    images["weight0"] = generate()
    pipe.unload_lora_weights()
    images["unloaded"] = generate()
    pipe.load_lora_weights(args.lora, weight_name=WEIGHT_NAME, adapter_name="stella")
    pipe.fuse_lora()
    images["fused"] = generate()
    assert "stella_diffusion" not in sys.modules, "the stock side must not import stella_diffusion"
    np.savez(args.out, **images)


if __name__ == "__main__":
    main()
