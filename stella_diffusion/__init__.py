"""StelLA (Stiefel low-rank adaptation) for peft, diffusers and transformers.

Importing the package registers the ``stella`` method with peft, so ``get_peft_model(model, StellaConfig(...))``
and ``PeftModel.from_pretrained`` work as for LoRA.
"""

from .manifold import RETRACTIONS, orthonormality_error
from .optim import (
    RiemannianHooks,
    create_stella_optimizer,
    make_riemannian,
    stella_parameter_groups,
    stiefel_factors,
    stiefel_parameters,
)
from .tuner import StellaConfig, StellaLayer, StellaModel

__version__ = "0.1.0"

__all__ = [
    "RETRACTIONS",
    "RiemannianHooks",
    "StellaConfig",
    "StellaLayer",
    "StellaModel",
    "create_stella_optimizer",
    "make_riemannian",
    "orthonormality_error",
    "stella_parameter_groups",
    "stiefel_factors",
    "stiefel_parameters",
]
