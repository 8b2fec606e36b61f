"""What ``--cache_latents --pre_compute_text_embeddings`` saves per training step, StelLA and LoRA, in one run.

Each configuration runs ``train_dreambooth_stella.py`` on the embedded base (stella_diffusion/shapes/assets/
tiny-shapes-t2i, with the data and adapter settings of configs/tiny-demo.yaml) in a process of its own, so that
its peak memory is its own. Reported per configuration:

- step time: the median time between the starts of consecutive micro-steps after ``--warmup`` steps (data
  loading, VAE / text encoding or cache lookup, forward, backward, optimizer step), read from the script's own
  loop by timing each entry into its per-step RNG context (`families.step_rng`);
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS (it includes Python,
  torch and the models: the difference between configurations is what caching changes);
- the one-off caching time (the run's time before its first step, minus the uncached run's);
- what caching removes from a step (image loading, VAE encode, text encode on one batch, timed alone), which
  bounds the possible saving: on a base whose VAE and text encoder are small next to its denoiser the target
  cannot be reached, and the report says so.

Target (issue 16): cached step time ≤ 0.7 × uncached, for each adapter. A missed target is reported as missed.

    python benchmarks/caching.py [--steps 40] [--warmup 5] [--batch_size 8] [--threads 1] [--repeats 2]
        [--device cpu] [--output_dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package (and tests/), whichever stella_diffusion is installed
BASE = REPO / "stella_diffusion" / "shapes" / "assets" / "tiny-shapes-t2i"
DATA = REPO / "data" / "tiny-demo" / "concept-train"
# configs/tiny-demo.yaml's model and optimizer settings (its validation and evaluation are left out)
DEMO_ADAPTER = ["--rank", "8", "--lora_alpha", "8", "--lora_layers",
                "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2", "--resolution", "32",
                "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--mixed_precision", "no"]
TARGET_RATIO = 0.7
CACHE_FLAGS = ["--cache_latents", "--pre_compute_text_embeddings"]


def worker(spec: dict) -> dict:
    """One training run in this process; returns its step times and peak memory."""
    import torch

    from stella_diffusion.training import families
    from tests._train_fixtures import train_script

    torch.set_num_threads(spec["threads"])
    starts: list[float] = []
    real_step_rng = families.step_rng

    def timed_step_rng(seed, device):
        if device.type == "cuda":
            torch.cuda.synchronize()
        starts.append(time.perf_counter())
        return real_step_rng(seed, device)

    families.step_rng = timed_step_rng
    script = train_script()
    began = time.perf_counter()
    script.main(script.parse_args(spec["argv"]))
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        kind = "process peak RSS"
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)][spec["warmup"] :]
    return {"median_step_s": statistics.median(steps), "steps_timed": len(steps), "peak_mib": peak,
            "peak_kind": kind, "setup_s": starts[0] - began}


def encoder_times(batch_size: int, threads: int, device: str, repeats: int = 20) -> dict:
    """What caching removes from a step, timed alone on one batch (ms): loading and cropping the images, the VAE
    encode, the text encode. Their sum over the uncached step time bounds what caching can save."""
    import torch
    from accelerate import PartialState
    from diffusers import DiffusionPipeline

    from stella_diffusion.training import data, families, records

    PartialState()  # the training modules log through accelerate
    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(str(BASE)).to(device)
    family = families.pipeline_family(BASE)
    dataset = data.DreamBoothDataset(records.captioned_records(DATA), size=32, seed=0)
    encode = family.prompt_encoder(pipe, {"text_encoder": pipe.text_encoder})

    def load() -> dict:
        return data.collate_fn([dataset[i] for i in range(batch_size)])

    batch = load()
    parts = {"load_images": load,
             "vae_encode": lambda: family.encode_latents(pipe.vae, batch["pixel_values"].to(device)),
             "text_encode": lambda: encode(batch["prompts"], torch.device(device))}
    times = {}
    with torch.no_grad():
        for name, work in parts.items():
            work()
            start = time.perf_counter()
            for _ in range(repeats):
                work()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name] = 1000 * (time.perf_counter() - start) / repeats
    return times


def run_config(adapter: str, cached: bool, args: argparse.Namespace, workdir: Path) -> dict:
    name = f"{adapter}-{'cached' if cached else 'uncached'}"
    argv = ["--pretrained_model_name_or_path", str(BASE), "--instance_data_dir", str(DATA),
            "--output_dir", str(workdir / name), "--adapter", adapter, *DEMO_ADAPTER,
            "--max_train_steps", str(args.steps + args.warmup + 1), "--train_batch_size", str(args.batch_size),
            "--checkpointing_steps", "100000", "--report_to", "none", "--seed", "0",
            *(CACHE_FLAGS if cached else [])]
    spec = {"argv": argv, "threads": args.threads, "warmup": args.warmup}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def markdown(rows: list[dict], summary: dict, parts: dict) -> str:
    lines = ["| adapter | caching | median step (ms) | peak memory (MiB) | setup (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {'cached' if r['cached'] else 'no'} | {1000 * r['median_step_s']:.1f} | "
                     f"{r['peak_mib']:.0f} | {r['setup_s']:.1f} |")
    lines.append("")
    for adapter, s in summary.items():
        verdict = "met" if s["target_met"] else "MISSED"
        lines.append(f"- {adapter}: cached / uncached step time = {s['ratio']:.2f} (target ≤ {TARGET_RATIO}: "
                     f"{verdict}; at best {s['best_possible_ratio']:.2f} on this base); peak memory "
                     f"{s['peak_delta_mib']:+.0f} MiB with caching.")
    timed = ", ".join(f"{name} {ms:.1f} ms" for name, ms in parts.items())
    lines.append(f"- What caching removes from a step, timed alone on one batch: {timed}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps first.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per configuration, in alternating order.")
    parser.add_argument("--device", type=str, default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output_dir", type=str, default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    runs: dict[tuple[str, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):  # uncached first, then cached first: drifting load hits both alike
            for adapter in ("stella", "lora"):
                for cached in (False, True) if repeat % 2 == 0 else (True, False):
                    result = run_config(adapter, cached, args, Path(workdir))
                    runs.setdefault((adapter, cached), []).append(result)
                    print(f"{adapter} {'cached' if cached else 'uncached'}: {1000 * result['median_step_s']:.1f} ms",
                          file=sys.stderr)
    rows = []
    for (adapter, cached), results in runs.items():
        rows.append({"adapter": adapter, "cached": cached, "repeats": len(results),
                     **{k: statistics.median(r[k] for r in results) if isinstance(results[0][k], float) else
                        results[0][k] for k in ("median_step_s", "peak_mib", "peak_kind", "setup_s")},
                     "median_step_s_per_repeat": [r["median_step_s"] for r in results]})
    rows.sort(key=lambda r: (r["adapter"] != "stella", r["cached"]))
    parts = encoder_times(args.batch_size, args.threads, args.device)
    summary = {}
    for adapter in ("stella", "lora"):
        plain, cached = (next(r for r in rows if r["adapter"] == adapter and r["cached"] is c) for c in (False, True))
        ratio = cached["median_step_s"] / plain["median_step_s"]
        summary[adapter] = {"ratio": ratio, "target_met": ratio <= TARGET_RATIO,
                            "peak_delta_mib": cached["peak_mib"] - plain["peak_mib"],
                            "best_possible_ratio": 1 - sum(parts.values()) / (1000 * plain["median_step_s"])}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "python": platform.python_version(),
              "settings": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                           "threads": args.threads, "repeats": args.repeats, "device": args.device,
                           "base": str(BASE.relative_to(REPO)),
                           "data": str(DATA.relative_to(REPO)), "cache_flags": CACHE_FLAGS},
              "target_ratio": TARGET_RATIO, "rows": rows, "cached_parts_ms": parts, "summary": summary}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "caching.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows, summary, parts))


if __name__ == "__main__":
    main()
