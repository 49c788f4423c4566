"""The one place that decides where arrays live.

CuPy on a usable CUDA device, NumPy otherwise. The user overrides the choice with `--device cpu|cuda` on the
CLI (which calls `set_device`) or the environment variable CUPAGED_DEVICE. Every other module asks this one
(`xp()`, `is_cuda()`), or follows the array it was given (`array_module`).
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENV_VAR = "CUPAGED_DEVICE"
DEVICES = ("cpu", "cuda")
_chosen: str | None = None


@functools.cache
def cuda_usable() -> bool:
    """True when CuPy imports and can allocate on a CUDA device."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        cupy.zeros(1).sum().item()  # a driver or toolkit mismatch shows up only on first use
        return True
    except Exception as exc:  # ImportError, CUDARuntimeError, missing libraries...
        logger.debug("CUDA not usable: %s", exc)
        return False


def set_device(name: str | None) -> str:
    """Choose the device for this process: 'cpu', 'cuda', or None for automatic. Returns the choice."""
    global _chosen
    name = name or os.environ.get(ENV_VAR) or ("cuda" if cuda_usable() else "cpu")
    name = name.lower()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not cuda_usable():
        raise RuntimeError(
            "device 'cuda' was asked for but no usable CUDA device was found: install cupaged[cuda12] or "
            "cupaged[cuda13] to match your driver, or use --device cpu"
        )
    _chosen = name
    return name


def device() -> str:
    """The current device name, choosing automatically on first use."""
    return _chosen or set_device(None)


def is_cuda() -> bool:
    return device() == "cuda"


def xp() -> ModuleType:
    """The array module of the current device: cupy or numpy."""
    if is_cuda():
        import cupy

        return cupy
    return np


def array_module(a: Any) -> ModuleType:
    """The module (numpy or cupy) that owns array `a`."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A host copy of `a` (no copy when it already is a NumPy array)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def lasting_empty(shape: int | tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised CuPy array from the default memory pool, whatever allocator is current.

    For buffers that outlive the call that makes them (workspaces kept per process, a CUDA graph's state): CUDA
    graphs are captured with a private pool that lends one graph's freed intermediates to the next graph (whose
    replays then write there) and goes away with its engine, so nothing lasting may come from it.
    """
    import cupy

    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    memory = cupy.get_default_memory_pool().malloc(max(count * dtype.itemsize, 1))
    return cupy.ndarray(shape, dtype, memptr=memory)


class HostCopy:
    """A device array's copy to host memory, started now and waited for by `result()`.

    On the GPU the copy is a cudaMemcpyAsync into pinned memory followed by an event, so the host can go on with
    other work (the engine's bookkeeping of the previous step) while the GPU computes; `result()` waits for that
    event alone, not for whatever was queued after the copy. A NumPy array is already on the host.
    """

    def __init__(self, a: Any):
        self._event = None
        if isinstance(a, np.ndarray):
            self._host = a
            return
        import cupy

        self._device = cupy.ascontiguousarray(a)  # kept alive until the copy has run
        self._host = np.frombuffer(cupy.cuda.alloc_pinned_memory(max(a.nbytes, 1)), a.dtype, a.size).reshape(a.shape)
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(self._host.ctypes.data, self._device.data.ptr, a.nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        self._event = stream.record()

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event = self._device = None
        return self._host


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(name: str) -> np.dtype:
    """The NumPy dtype for 'float32', 'float16' or 'bfloat16' (bf16 through ml_dtypes, as CuPy 14 uses it)."""
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "auto": None}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise RuntimeError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
