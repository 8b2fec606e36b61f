"""Devices a test runs on: the CPU always, CUDA where a GPU is present (marked ``gpu``; CI has none).

On a GPU machine ``pytest -m gpu`` runs just the CUDA cases: cuSOLVER's ``gesvda`` polar, the optimizer
hooks' fused finite check on CUDA, xformers attention and mixed-precision training.
"""

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
