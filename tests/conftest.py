"""Shared test setup: the `gpu` marker skips without a usable CUDA device; tools/ is importable."""

from __future__ import annotations

import sys
from pathlib import Path

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
