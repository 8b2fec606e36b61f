"""StelLA as a peft method (config / layer / model, as peft's own tuners are laid out)."""

from peft.utils import register_peft_method

from ._registration import STELLA_PEFT_TYPE
from .config import StellaConfig
from .layer import Conv2d, Linear, StellaLayer
from .model import StellaModel

__all__ = ["STELLA_PEFT_TYPE", "Conv2d", "Linear", "StellaConfig", "StellaLayer", "StellaModel"]

register_peft_method(name="stella", config_cls=StellaConfig, model_cls=StellaModel, prefix="stella_")
