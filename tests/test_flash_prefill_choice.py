"""Which prefill kernel flash_prefill_attention runs (layers/flash_prefill.kernel_for), without a GPU: every case
here resolves to fa2 before the device is asked."""

from __future__ import annotations

import pytest

from cupaged.layers import flash_prefill


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(flash_prefill.ENV_KERNEL, raising=False)
    monkeypatch.delenv(flash_prefill.ENV_CONFIG, raising=False)


@pytest.mark.parametrize("kwargs", [
    {"kernel": "fa2"},
    {"kernel": "sm90", "fp8": True},                # the sm90 kernel reads fp16/bf16 caches only
    {"kernel": "auto", "config": (4, 2, 64)},       # an fa2 tile configuration asks for fa2
])
def test_fa2_where_sm90_does_not_apply(kwargs) -> None:
    assert flash_prefill.kernel_for("bfloat16", 128, **kwargs) == "fa2"


def test_other_head_sizes_stay_on_fa2(monkeypatch) -> None:
    monkeypatch.setenv(flash_prefill.ENV_KERNEL, "sm90")
    assert flash_prefill.kernel_for("float16", 64) == "fa2"


def test_tile_config_from_the_environment_means_fa2(monkeypatch) -> None:
    monkeypatch.setenv(flash_prefill.ENV_CONFIG, "4,2,32")
    assert flash_prefill.kernel_for("bfloat16", 128, kernel="sm90") == "fa2"


def test_unknown_kernel_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match="prefill kernel"):
        flash_prefill.kernel_for("bfloat16", 128, kernel="fa3")
    monkeypatch.setenv(flash_prefill.ENV_KERNEL, "wgmma")
    with pytest.raises(ValueError, match="prefill kernel"):
        flash_prefill.kernel_for("bfloat16", 128)


def test_sm90_shared_memory_fits_hopper() -> None:
    assert flash_prefill.smem_bytes_sm90(overlap=True) <= 227 * 1024
