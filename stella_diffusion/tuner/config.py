"""`StellaConfig`: the peft configuration of a StelLA adapter (docs/algorithm.md §1–3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ..manifold import RETRACTIONS
from ._registration import STELLA_PEFT_TYPE

INIT_METHODS = ("orthonormal", "svd_major", "svd_minor", "zero")


@dataclass
class StellaConfig(PeftConfig):
    """Configuration of a StelLA adapter ``ΔW = s · U S Vᵀ`` with ``U``, ``V`` on the Stiefel manifold.

    The fields mirror `peft.LoraConfig` where the meaning is the same (``r``, ``target_modules``,
    ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ``layers_to_transform``,
    ``fan_in_fan_out``, ``use_rslora``, ``bias``). The StelLA-specific ones:

    Args:
        alpha: scale numerator, ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter's input.
        diag_s: store ``S`` as r values (diagonal) instead of a full r × r matrix (the default, as in the
            paper's parameter counts; the official commonsense script uses diagonal).
        init_weights: ``"orthonormal"`` (the paper's default: random orthonormal U, V and S = I),
            ``"svd_major"`` / ``"svd_minor"`` (top / bottom r singular vectors of W), ``"zero"`` (the paper's
            "Zero" ablation: random orthonormal U, V and S = 0, so the model equals the base at step 0 without the
            frozen buffers of ``function_preserving``; U and V start moving once S has).
        function_preserving: keep the initial ``ΔW₀`` as a frozen offset that is subtracted, so the adapted
            model equals the base model at step 0 (off by default: the paper found it worse).
        retraction: the retraction the Riemannian optimizer uses (``polar`` default, ``exp``, ``qr``,
            ``cayley``); read by `make_riemannian` when it is not given one explicitly.
        grad_scaling: ``True`` divides each step by ``sqrt(n / c)`` with ``c`` the model's hidden size (else
            the median tall dimension), a float sets ``c``, ``False`` turns it off.
    """

    r: int = field(default=8, metadata={"help": "StelLA rank"})
    alpha: float = field(default=8, metadata={"help": "scale numerator: s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability on the adapter input"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "module names (suffix match) or a regex to adapt; 'all-linear' for every linear layer"},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex to leave alone"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(r)"})
    diag_s: bool = field(default=False, metadata={"help": "diagonal S (r values) instead of a full r x r S"})
    init_weights: Literal["orthonormal", "svd_major", "svd_minor", "zero"] = field(
        default="orthonormal", metadata={"help": "initialisation of U, S, V"}
    )
    function_preserving: bool = field(
        default=False, metadata={"help": "subtract the initial product so the model starts unchanged"}
    )
    retraction: Literal["polar", "exp", "qr", "cayley"] = field(
        default="polar", metadata={"help": "retraction used by the Riemannian optimizer"}
    )
    grad_scaling: bool | float = field(
        default=True, metadata={"help": "divide steps by sqrt(n / c); True: c = hidden size; float: c"}
    )
    bias: Literal["none", "all", "stella_only"] = field(default="none", metadata={"help": "which biases train"})
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    rank_pattern: dict | None = field(default_factory=dict, metadata={"help": "per-module rank overrides"})
    alpha_pattern: dict | None = field(default_factory=dict, metadata={"help": "per-module alpha overrides"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "extra modules trained in full and saved with the adapter"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = STELLA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        for name, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(f"StelLA `{name}` must be a positive integer; got {rank!r}.")
        if self.init_weights not in INIT_METHODS:
            raise ValueError(f"`init_weights` must be one of {INIT_METHODS}; got {self.init_weights!r}.")
        if self.retraction not in RETRACTIONS:
            raise ValueError(f"`retraction` must be one of {RETRACTIONS}; got {self.retraction!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout}.")
        if not isinstance(self.grad_scaling, bool) and not self.grad_scaling > 0:
            raise ValueError(f"`grad_scaling` must be a bool or a positive width; got {self.grad_scaling!r}.")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of the module at ``module_name``, ``rank_pattern`` / ``alpha_pattern`` applied.

        Args:
            module_name: the module's path in the model.
        """
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module_name), self.alpha)
        return r, alpha
