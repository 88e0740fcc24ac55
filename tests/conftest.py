"""Shared fixtures: synthetic tiny checkpoints, generated once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

# This checkout first: a GPU host may have an unrelated top-level `kernels` package (HF's kernel
# hub client, installed with transformers) that would shadow ours.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from backend.synthetic import generate, tiny_args  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(flavor, **ModelArgs overrides) -> path of a tiny checkpoint (cached)."""
    made = {}

    def make(flavor: str = "nvidia-nvfp4", fp8_scale: str = "e8m0", **overrides):
        key = (flavor, fp8_scale, tuple(sorted((k, str(v)) for k, v in overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{flavor}")
            made[key] = generate(path, flavor=flavor, fp8_scale=fp8_scale, args=tiny_args(**overrides))
        return made[key]

    return make
