"""``--use_ema``: an exponential moving average of the adapter, kept a valid StelLA adapter.

diffusers' `EMAModel` averages every trainable parameter (S, and LoRA's A / B, plainly); after each update the
averages of U and V, which have drifted off the Stiefel manifold, are retracted back onto it (polar factor), so
the EMA weights export like any trained StelLA adapter. The average is saved in every checkpoint as safetensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import manifold
from ..optim import stella_layers

EMA_WEIGHT_NAME = "ema_adapter.safetensors"


class AdapterEMA:
    """The EMA of the trainable parameters of ``models`` (decay warms up as ``(1 + t) / (10 + t)`` up to
    ``decay``, `EMAModel`'s schedule)."""

    def __init__(self, models: Sequence[nn.Module], decay: float) -> None:
        self.params = [p for m in models for p in m.parameters() if p.requires_grad]
        self.ema = EMAModel(self.params, decay=decay)
        # (position in params, stored transposed): U is (n, r); Vt is (r, n), retracted as its transpose
        position = {id(p): i for i, p in enumerate(self.params)}
        self.stiefel = [(position[id(f)], transposed) for m in models for layer in stella_layers(m)
                        for name in layer.stella_U
                        for f, transposed in ((layer.stella_U[name], False), (layer.stella_Vt[name], True))
                        if id(f) in position]

    @torch.no_grad()
    def step(self) -> None:
        """Average in the current parameters, then put the averaged U and V back on the manifold."""
        self.ema.step(self.params)
        for index, transposed in self.stiefel:
            shadow = self.ema.shadow_params[index]
            tall = shadow.mT if transposed else shadow
            retracted = manifold.polar(tall).to(shadow.dtype)
            shadow.copy_(retracted.mT if transposed else retracted)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The models hold the EMA weights inside the block (for the export), their own weights again after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / EMA_WEIGHT_NAME
        tensors = {str(i): s.detach().float().cpu().contiguous() for i, s in enumerate(self.ema.shadow_params)}
        save_file(tensors, path, metadata={"optimization_step": str(self.ema.optimization_step)})
        return path

    def load(self, directory: str | Path) -> bool:
        """Restore a saved average; ``False`` (the average restarts from the current weights) when there is none."""
        path = Path(directory) / EMA_WEIGHT_NAME
        if not path.is_file():
            self.ema.shadow_params = [p.detach().clone() for p in self.params]
            return False
        tensors = load_file(path)
        with safe_open(str(path), framework="pt") as handle:
            self.ema.optimization_step = int(handle.metadata()["optimization_step"])
        for i, shadow in enumerate(self.ema.shadow_params):
            shadow.copy_(tensors[str(i)])
        return True
