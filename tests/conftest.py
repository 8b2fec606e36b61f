"""Shared test set-up: offline, deterministic, one thread (CI has 2 cores).

Everything the tests need is set here, before torch is imported, so `python -m pytest` needs no environment
variable: subprocesses inherit the same settings (offline hub, one OpenMP thread).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# one OpenMP thread here and in every subprocess: results compared across processes then match bit for bit
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from stella_diffusion.testing import build_tiny_pipeline  # noqa: E402

from ._train_fixtures import captioned_folder, dreambooth_folder  # noqa: E402

# one intra-op thread: on 2 shared cores the tiny models run 10-30x faster than with two
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Inputs of the training-script tests, built once per session (read-only: runs write elsewhere).
@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory):
    return build_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    return dreambooth_folder(tmp_path_factory.mktemp("data") / "concept")


@pytest.fixture(scope="session")
def style_dir(tmp_path_factory):
    return captioned_folder(tmp_path_factory.mktemp("data") / "style")
