"""Shared test setup: the `gpu` marker skips without a usable CUDA device; tools/ is importable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests import tools.make_checkpoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from cupaged.device import cuda_usable

    if cuda_usable():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """checkpoints(preset, dtype="float32") -> a random-weight checkpoint directory, made once per session."""
    from tools.make_checkpoint import make_checkpoint

    made: dict[tuple[str, str], Path] = {}

    def get(preset: str, dtype: str = "float32") -> Path:
        if (preset, dtype) not in made:
            made[preset, dtype] = make_checkpoint(tmp_path_factory.mktemp(preset), preset, dtype=dtype)
        return made[preset, dtype]

    return get


@pytest.fixture(scope="module")
def ops():
    """The CUDA op set (layers/cuda_ops.py), with cupaged's device set to the GPU: for GPU kernel tests."""
    from cupaged import device
    from cupaged.layers import cuda_ops

    device.set_device("cuda")
    return cuda_ops


@pytest.fixture
def poison_memory_pool(ops):
    """Fill the memory CuPy will hand out next with NaN (int32 outputs: garbage), so an output element a kernel
    forgets shows. GPU test modules use it on every test (`pytest.mark.usefixtures`)."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    poison = cupy.full(64 << 20, np.nan, dtype=cupy.float32)  # 256 MiB back to the pool, NaN-filled
    del poison
