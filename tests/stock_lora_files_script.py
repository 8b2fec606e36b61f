"""Run in a separate process by the tests: a STOCK diffusers pipeline loads each given LoRA file in turn.

It never imports `stella_diffusion`. For every file it loads the LoRA, draws the images, fuses, draws again and
unloads; the images go to an ``.npz`` file as ``<i>_loaded`` / ``<i>_fused`` (i = the file's position), with
``<i>_adapters`` (`get_list_adapters` as JSON) and ``base`` (no LoRA).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_threads", type=int, required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--lora", action="append", required=True, help="a LoRA file; repeatable")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--generation_kwargs", default="{}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    kwargs = json.loads(args.generation_kwargs)
    torch.set_num_threads(args.num_threads)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> np.ndarray:
        return np.asarray(pipe(args.prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs).images)

    images = {"base": generate()}
    for i, lora in enumerate(args.lora):
        # folder + weight_name: diffusers < 0.42.1 refuses a bare file path offline
        pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name, adapter_name=f"file{i}")
        images[f"{i}_loaded"] = generate()
        # which components got the adapter: a loader may skip keys it cannot map with only a warning
        images[f"{i}_adapters"] = np.array(json.dumps(pipe.get_list_adapters()))
        pipe.fuse_lora()
        images[f"{i}_fused"] = generate()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert "stella_diffusion" not in sys.modules, "the stock side must not import stella_diffusion"
    np.savez(args.out, **images)


if __name__ == "__main__":
    main()
