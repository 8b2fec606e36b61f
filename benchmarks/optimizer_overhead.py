"""Cost of StelLA's Riemannian optimizer against peft LoRA on the same UNet, rank and batch, in one run.

Both variants are built from the same seed (same base weights), train on the same batches, and are timed
step by step in alternation (StelLA, LoRA, LoRA, StelLA, ...), so that load from other processes on a shared
machine hits both alike; on CPU the clock is the process's CPU time (see `Clock`), wall times are kept too.
Reported:

- step time: forward + backward + ``optimizer.step()`` + ``zero_grad()``, median over ``--steps`` steps after
  ``--warmup``; the ratio StelLA ÷ LoRA of the medians (and the median of the per-pair ratios as a check);
  forward + backward and ``optimizer.step()`` are also timed apart, to tell where a difference comes from;
- hook share: time inside the optimizer's StelLA pre- and post-step hooks (the library's own hooks, timed where
  ``step()`` calls them; the finite-gradient check of the pre-hook also on its own) ÷ the StelLA step time;
- peak memory of one step: the bytes the model and optimizer keep between steps (parameters, buffers, optimizer
  state; counted from their storages) plus the peak of what the step allocates on top (activations, gradients,
  hook temporaries). On CUDA the latter is ``torch.cuda.max_memory_allocated``; on CPU it is read from the
  allocation events of torch's profiler (``profile_memory=True``). Process RSS is not used: it mixes in the
  other variant, the allocator's caching and Python's own memory;
- retraction, batched (one `manifold.retract` call per shape on the stacked matrices, what the post-step hook
  does) vs one by one (a Python loop over the same matrices): on the UNet's real adapter shapes and on the
  paper's case (192 matrices of 4096 × 32, docs/algorithm.md §5).

Targets (issue): step ratio ≤ 1.05 and hook share ≤ 3 % on the tiny SD UNet (checked at each ``--batch_size``),
batched ≥ 5× one by one (checked on each set). A missed target is reported as missed.

    python benchmarks/optimizer_overhead.py [--batch_size 8 32] [--rank 4] [--steps 60] [--realistic_steps 12]
        [--warmup 3] [--repeats 15] [--threads 1] [--device cpu] [--retraction polar]
        [--paper_case 192 4096 32] [--skip_realistic] [--quick] [--output_dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from torch import nn
from torch.profiler import ProfilerActivity, profile

from stella_diffusion import StellaConfig, create_stella_optimizer, manifold

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TARGETS = {"step_time_ratio": 1.05, "hook_share": 0.03, "batched_speedup": 5.0}
# the paper's text-to-image learning rates (docs/algorithm.md §5); they do not change the cost
STELLA_LR, LORA_LR = 8e-4, 1e-4
MIB = 2**20
PHASES = ("forward_backward", "optimizer_step", "zero_grad")  # the parts of a step, timed apart


@dataclass(frozen=True)
class UNetPoint:
    """One model size to measure: a `UNet2DConditionModel` built from config, and its batch."""

    name: str
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    cross_attention_dim: int
    norm_num_groups: int
    text_tokens: int
    batch_size: int
    latent_size: int = 16

    def build(self, seed: int) -> UNet2DConditionModel:
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=self.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            layers_per_block=1,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=self.norm_num_groups,
        )


def tiny_point(batch_size: int) -> UNetPoint:
    """The embedded tiny SD UNet: 1.7 M parameters, 14 attention layers."""
    return UNetPoint(
        name="tiny SD UNet (32, 64, 64)",
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=16,
        text_tokens=8,
        batch_size=batch_size,
    )


def realistic_point() -> UNetPoint:
    """SD 1.5's widths (320, 640) and text width (768, 77 tokens) with two of its four levels, batch 2."""
    return UNetPoint(
        name="SD-1.5 widths (320, 640)",
        block_out_channels=(320, 640),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        norm_num_groups=32,
        text_tokens=77,
        batch_size=2,
    )


@dataclass
class Batch:
    """One training batch, on the device before timing starts."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor


def make_batches(point: UNetPoint, count: int, device: torch.device, seed: int) -> list[Batch]:
    """Noised random latents, random timesteps and random text states: the work of a real diffusion step."""
    g = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler()
    size = point.latent_size
    batches = []
    for _ in range(count):
        latents = torch.randn(point.batch_size, 4, size, size, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (point.batch_size,), generator=g)
        text = torch.randn(point.batch_size, point.text_tokens, point.cross_attention_dim, generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        batches.append(Batch(*(t.to(device) for t in (noisy, timesteps, text, noise))))
    return batches


class Clock:
    """Reads how long a piece of work took on ``device``.

    On CPU this is the process's CPU time (`time.process_time`): the machines this runs on are shared with
    other jobs, and wall time also counts the time slices the scheduler gives to them, a noise as large as the
    differences measured here; CPU time counts this process's work only (with one torch thread it is what the
    wall time would be on an idle core; with more threads it sums them, spin-waits included, so compare runs of
    one thread count only). Whole steps are also timed by the wall clock, for reference. On CUDA the clock is
    wall time after a device synchronisation (kernels run asynchronously).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = device.type == "cpu"
        self.name = "process CPU time (time.process_time)" if self.cpu else "wall time after cuda synchronize"

    def now(self) -> float:
        if not self.cpu:
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.cpu else time.perf_counter()


class HookTimer:
    """Times the optimizer's StelLA hooks where ``step()`` calls them.

    The library registers ``RiemannianHooks._pre_step`` / ``_post_step`` as the optimizer's only step hooks;
    they are unregistered and the same bound methods registered again behind a timer, so the hooks run
    unchanged and in the same place. The finite-gradient check inside the pre-hook is timed too (an instance
    attribute shadows the method), to tell it apart from the manifold work.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clock: Clock) -> None:
        hooks = optimizer.stella
        hooks.remove()
        self.clock = clock
        self.pre: list[float] = []
        self.post: list[float] = []
        self.finite_check: list[float] = []
        optimizer.register_step_pre_hook(self._timed(hooks._pre_step, self.pre))
        optimizer.register_step_post_hook(self._timed(hooks._post_step, self.post))
        hooks._all_grads_finite = self._timed(hooks._all_grads_finite, self.finite_check)

    def _timed(self, fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.now()
            result = fn(*args, **kwargs)
            into.append(self.clock.now() - start)
            return result

        return wrapper

    def clear(self) -> None:
        for times in (self.pre, self.post, self.finite_check):
            times.clear()


@dataclass
class Variant:
    """One adapted UNet with its optimizer, and its measurements."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clock: Clock
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def step(self, batch: Batch, record: bool = True) -> None:
        """One training step; with ``record`` its time, its wall time and each phase's time (`PHASES`) are kept."""
        wall = time.perf_counter()
        marks = [self.clock.now()]
        prediction = self.model(batch.noisy, batch.timesteps, batch.text).sample
        F.mse_loss(prediction, batch.noise).backward()
        marks.append(self.clock.now())
        self.optimizer.step()
        marks.append(self.clock.now())
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(self.clock.now())
        if record:
            self.times["step_wall"].append(time.perf_counter() - wall)
            self.times["step"].append(marks[-1] - marks[0])
            for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
                self.times[phase].append(end - start)

    def median_ms(self, phase: str) -> float:
        return 1e3 * statistics.median(self.times[phase])


def build_variants(point: UNetPoint, rank: int, clock: Clock, seed: int) -> tuple[Variant, Variant]:
    """StelLA and LoRA on the same base weights and targets, each with its AdamW (weight decay 0.01)."""
    stella_unet = point.build(seed).to(clock.device)
    stella_unet.requires_grad_(False)
    stella_unet.add_adapter(StellaConfig(r=rank, alpha=rank, target_modules=TARGET_MODULES))
    stella_opt = create_stella_optimizer(stella_unet, torch.optim.AdamW, lr=STELLA_LR, weight_decay=0.01)

    lora_unet = point.build(seed).to(clock.device)
    lora_unet.requires_grad_(False)
    lora_unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    )
    lora_params = [p for p in lora_unet.parameters() if p.requires_grad]
    lora_opt = torch.optim.AdamW(lora_params, lr=LORA_LR, weight_decay=0.01)
    return Variant("StelLA", stella_unet, stella_opt, clock), Variant("LoRA", lora_unet, lora_opt, clock)


def kept_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the storages that live between steps: parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(variant: Variant, batch: Batch, device: torch.device) -> int:
    """Peak bytes allocated by one training step above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        variant.step(batch, record=False)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(batch, record=False)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_point(
    point: UNetPoint, steps: int, args: argparse.Namespace, clock: Clock
) -> tuple[dict[str, Any], Counter[tuple[int, int]]]:
    """Step times (interleaved), hook times and peak memory of StelLA vs LoRA on one UNet.

    Also returns the tall shapes (n, r) of the StelLA factors, for the retraction benchmark on real shapes.
    """
    stella, lora = build_variants(point, args.rank, clock, args.seed)
    timer = HookTimer(stella.optimizer, clock)
    batches = make_batches(point, 4, clock.device, args.seed)
    for i in range(args.warmup):
        for variant in (stella, lora):
            variant.step(batches[i % len(batches)], record=False)
    memory = {}
    for variant in (stella, lora):
        kept = kept_bytes(variant.model, variant.optimizer)
        transient = step_peak_bytes(variant, batches[0], clock.device)
        memory[variant.name] = {
            "kept_mib": kept / MIB,
            "step_peak_mib": transient / MIB,
            "peak_mib": (kept + transient) / MIB,
        }
    timer.clear()
    for i in range(steps):
        # alternate who goes first, so that neither always runs right after the other's allocations
        for variant in (stella, lora) if i % 2 == 0 else (lora, stella):
            variant.step(batches[i % len(batches)])

    stella_ms, lora_ms = stella.median_ms("step"), lora.median_ms("step")
    pre_ms, post_ms, finite_ms = (1e3 * statistics.median(t) for t in (timer.pre, timer.post, timer.finite_check))
    factors = stella.optimizer.stella.factors
    shapes = Counter((max(f.param.shape), min(f.param.shape)) for f in factors)
    row = {
        "point": point.name,
        "unet": {**asdict(point), "parameters": sum(p.numel() for p in stella.model.parameters())},
        "trainable_parameters": {
            v.name: sum(p.numel() for p in v.model.parameters() if p.requires_grad) for v in (stella, lora)
        },
        "stiefel_factors": len(factors),
        "factor_shapes": {f"{n}x{r}": count for (n, r), count in sorted(shapes.items())},
        "steps_timed": steps,
        "step_ms": {"StelLA": stella_ms, "LoRA": lora_ms},
        "step_wall_ms": {v.name: v.median_ms("step_wall") for v in (stella, lora)},
        "phase_ms": {v.name: {phase: v.median_ms(phase) for phase in PHASES} for v in (stella, lora)},
        "step_time_ratio": stella_ms / lora_ms,
        "step_time_ratio_paired_median": statistics.median(
            s / t for s, t in zip(stella.times["step"], lora.times["step"], strict=True)
        ),
        "hook_ms": {"pre": pre_ms, "post": post_ms, "pre_finite_grad_check": finite_ms},
        "hook_share": (pre_ms + post_ms) / stella_ms,
        "memory": memory,
        "peak_memory_ratio": memory["StelLA"]["peak_mib"] / memory["LoRA"]["peak_mib"],
    }
    return row, shapes


def _elapsed(fn: Callable[[], object], clock: Clock, calls: int = 1) -> float:
    """Time of one call of ``fn``, averaged over ``calls`` back-to-back calls."""
    start = clock.now()
    for _ in range(calls):
        fn()
    return (clock.now() - start) / calls


def measure_retraction(
    name: str, shapes: Counter[tuple[int, int]], args: argparse.Namespace, clock: Clock
) -> dict[str, Any]:
    """One `retract` call per shape on the stacked matrices vs one call per matrix (interleaved medians)."""
    g = torch.Generator().manual_seed(args.seed)
    stacks = []
    for (n, r), count in shapes.items():
        x = manifold.qr_orthonormal(torch.randn(count, n, r, generator=g)).to(clock.device)
        delta = manifold.project_tangent(x, 1e-3 * torch.randn(x.shape, generator=g).to(clock.device))
        stacks.append((x, delta))

    def batched() -> None:
        for x, delta in stacks:
            manifold.retract(x, delta, args.retraction)

    def one_by_one() -> None:
        for x, delta in stacks:
            for i in range(x.shape[0]):
                manifold.retract(x[i], delta[i], args.retraction)

    one_by_one()  # warm-up
    # a sample of at least ~20 ms, so that sub-millisecond calls are not lost in the clock's and scheduler's noise
    calls = max(1, math.ceil(0.02 / max(_elapsed(batched, clock), 1e-6)))
    times: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    for _ in range(args.repeats):
        times["batched"].append(_elapsed(batched, clock, calls))
        times["one_by_one"].append(_elapsed(one_by_one, clock, calls))
    batched_ms, loop_ms = (1e3 * statistics.median(times[k]) for k in ("batched", "one_by_one"))
    return {
        "set": name,
        "matrices": shapes.total(),
        "shapes": {f"{n}x{r}": count for (n, r), count in sorted(shapes.items())},
        "retraction": args.retraction,
        "calls_per_sample": calls,
        "batched_ms": batched_ms,
        "one_by_one_ms": loop_ms,
        "speedup": loop_ms / batched_ms,
    }


def _check(
    target: str, where: str, value: float, at_most: float | None = None, at_least: float | None = None
) -> dict[str, Any]:
    met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    limit = f"<= {at_most}" if at_most is not None else f">= {at_least}"
    return {"target": target, "where": where, "value": value, "limit": limit, "met": met}


def target_checks(tiny: list[dict[str, Any]], retractions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each issue target against its measured value: step and hook targets on each tiny-UNet batch size, the
    speed-up on every retraction set."""
    checks = []
    for row in tiny:
        where = f"{row['point']}, batch {row['unet']['batch_size']}"
        checks.append(_check("step time ratio", where, row["step_time_ratio"], at_most=TARGETS["step_time_ratio"]))
        checks.append(_check("hook share", where, row["hook_share"], at_most=TARGETS["hook_share"]))
    for row in retractions:
        speedup = row["speedup"]
        checks.append(_check("batched retraction speed-up", row["set"], speedup, at_least=TARGETS["batched_speedup"]))
    return checks


def print_tables(result: dict[str, Any]) -> None:
    """The Markdown tables of the README: step cost, where the time goes, retraction, targets."""
    config = result["config"]
    print(
        f"StelLA vs LoRA, rank {config['rank']}, AdamW, {config['device']}, {config['torch_threads']} thread(s), "
        f"medians of interleaved steps; clock: {config['clock']}; memory: {config['memory_method']}"
    )
    print()
    print(
        "| model | batch | steps | StelLA step ms | LoRA step ms | ratio | hooks ms | hook share "
        "| peak MiB StelLA / LoRA | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in result["points"]:
        hooks, mem = p["hook_ms"], p["memory"]
        print(
            f"| {p['point']} | {p['unet']['batch_size']} | {p['steps_timed']} | {p['step_ms']['StelLA']:.1f} "
            f"| {p['step_ms']['LoRA']:.1f} | {p['step_time_ratio']:.3f} | {hooks['pre'] + hooks['post']:.2f} "
            f"| {100 * p['hook_share']:.2f} % | {mem['StelLA']['peak_mib']:.1f} / {mem['LoRA']['peak_mib']:.1f} "
            f"| {p['peak_memory_ratio']:.3f} |"
        )
    print()
    print(
        "| model | forward + backward ms StelLA / LoRA | optimizer.step ms StelLA / LoRA "
        "| StelLA hooks ms: pre (finite-grad check) + post |"
    )
    print("|---|---:|---:|---:|")
    for p in result["points"]:
        stella, lora, hooks = p["phase_ms"]["StelLA"], p["phase_ms"]["LoRA"], p["hook_ms"]
        print(
            f"| {p['point']} | {stella['forward_backward']:.1f} / {lora['forward_backward']:.1f} "
            f"| {stella['optimizer_step']:.2f} / {lora['optimizer_step']:.2f} "
            f"| {hooks['pre']:.2f} ({hooks['pre_finite_grad_check']:.2f}) + {hooks['post']:.2f} |"
        )
    print()
    print(f"| retraction ({config['retraction']}) of | matrices | batched ms | one by one ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for row in result["retraction"]:
        shapes = ", ".join(f"{count} × {shape}" for shape, count in row["shapes"].items())
        print(
            f"| {row['set']} ({shapes}) | {row['matrices']} | {row['batched_ms']:.2f} | {row['one_by_one_ms']:.2f} "
            f"| {row['speedup']:.1f}× |"
        )
    print()
    for check in result["targets"]:
        status = "met" if check["met"] else "MISSED"
        print(f"- {check['target']} ({check['where']}): {check['value']:.3f}, target {check['limit']}: {status}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--batch_size", type=int, nargs="+", default=[8, 32], help="tiny-UNet batch sizes (the paper trains with 8)"
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--realistic_steps", type=int, default=12, help="timed steps on the larger UNet")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--repeats", type=int, default=15, help="timings of each retraction set")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared box)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--retraction", default="polar", choices=manifold.RETRACTIONS)
    parser.add_argument(
        "--paper_case",
        type=int,
        nargs=3,
        default=(192, 4096, 32),
        metavar=("COUNT", "N", "R"),
        help="the paper's batched-SVD case: COUNT matrices of N × R",
    )
    parser.add_argument("--skip_realistic", action="store_true", help="measure the tiny UNet only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests (numbers meaningless)")
    parser.add_argument("--output_dir", default="benchmarks/results", help="where optimizer_overhead.json goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = [2], 2, 1, 2
        args.paper_case, args.skip_realistic = (8, 256, 32), True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)

    points = [(tiny_point(batch_size), args.steps) for batch_size in args.batch_size]
    if not args.skip_realistic:
        points.append((realistic_point(), args.realistic_steps))
    measured, retraction_sets = [], {}
    for point, steps in points:
        row, shapes = measure_point(point, steps, args, clock)
        measured.append(row)
        retraction_sets[f"{point.name} adapters"] = shapes  # one set per model, whatever the batch
    count, n, r = args.paper_case
    retraction_sets["paper case"] = Counter({(n, r): count})
    retractions = [measure_retraction(name, shapes, args, clock) for name, shapes in retraction_sets.items()]

    memory_method = (
        "kept (params + buffers + optimizer state) + step peak from torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "kept (params + buffers + optimizer state) + step peak from torch profiler CPU allocation events"
    )
    result = {
        "config": {
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
            "rank": args.rank,
            "alpha": args.rank,
            "targets": TARGET_MODULES,
            "optimizer": f"AdamW (weight decay 0.01), lr StelLA {STELLA_LR}, LoRA {LORA_LR}",
            "retraction": args.retraction,
            "steps": args.steps,
            "realistic_steps": None if args.skip_realistic else args.realistic_steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "clock": clock.name,
            "memory_method": memory_method,
            "quick": args.quick,
        },
        "points": measured,
        "retraction": retractions,
        "targets": target_checks(measured[: len(args.batch_size)], retractions),
    }
    print_tables(result)
    output = Path(args.output_dir, "optimizer_overhead.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
