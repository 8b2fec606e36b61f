"""How the Riemannian hooks lay out the constrained factors: every factor of one tall shape and device in one
(k, n, r) float32 stack, so each step does one batched retraction per shape (docs/algorithm.md §3, step 4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Factor:
    """One constrained matrix: ``U`` as is, or ``Vt`` read transposed, with its gradient-scaling factor."""

    param: nn.Parameter
    transposed: bool
    step_scale: float

    @property
    def tall_shape(self) -> tuple[int, int]:
        rows, cols = self.param.shape
        return (cols, rows) if self.transposed else (rows, cols)


class Batch:
    """Factors of one tall shape on one device, handled as one (k, n, r) float32 stack: the U's, then the Vt's.

    Each kind is stacked whole and transposed as one block (stacking k transposed views one by one costs a
    strided copy each, about 15x slower for 56 matrices of 4 × 64). The stack is stored as (k, r, n), the layout
    that the manifold's products read and write fastest, and handed on as its (k, n, r) transposed view.
    """

    def __init__(self, factors: Sequence[Factor], device: torch.device) -> None:
        self.factors = [f for f in factors if not f.transposed] + [f for f in factors if f.transposed]
        self.device = device
        self.params = [f.param for f in self.factors]
        self._n_u = len(self.factors) - sum(f.transposed for f in self.factors)
        scales = [f.step_scale for f in self.factors]
        # one number where the whole batch shares it (the usual case), else one per matrix
        self.step_scale: float | torch.Tensor = (
            scales[0] if len(set(scales)) == 1 else torch.tensor(scales, device=device).view(-1, 1, 1)
        )

    def with_grads(self) -> tuple[Batch, list[torch.Tensor]] | None:
        """This batch (or the part of it whose factors received a gradient this step) and the gradients."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            present = [f for f in self.factors if f.param.grad is not None]
            if not present:
                return None
            part = Batch(present, self.device)
            return part, [p.grad for p in part.params]
        return self, grads

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A new (k, n, r) float32 stack of the factors' values or gradients (``tensors`` in ``self.params`` order)."""
        parts = [torch.stack(tensors[: self._n_u]).mT] if self._n_u else []
        if self._n_u < len(tensors):
            parts.append(torch.stack(tensors[self._n_u :]))
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).float().mT

    def write(self, targets: list[torch.Tensor], stacked: torch.Tensor) -> None:
        """Copy a (k, n, r) stack into ``targets`` (the factors' values or gradients), one call for all."""
        n_u = self._n_u
        torch._foreach_copy_(targets, [*stacked[:n_u].unbind(0), *stacked[n_u:].mT.unbind(0)])


def batches(factors: Iterable[Factor]) -> list[Batch]:
    """Factors of the same tall shape and device are processed as one batch (one retraction call per shape)."""
    groups: dict[tuple, list[Factor]] = defaultdict(list)
    for f in factors:
        groups[(f.tall_shape, f.param.device)].append(f)
    return [Batch(group, device) for (_, device), group in groups.items()]
