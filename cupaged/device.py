"""The one place that decides where arrays live.

CuPy on a usable CUDA device, NumPy otherwise. The user overrides the choice with `--device cpu|cuda` on the
CLI (which calls `set_device`) or the environment variable CUPAGED_DEVICE. Every other module asks this one
(`xp()`, `is_cuda()`), or follows the array it was given (`array_module`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENV_VAR = "CUPAGED_DEVICE"
DEVICES = ("cpu", "cuda")
_chosen: str | None = None
_cuda_error: BaseException | None = None  # why cuda_usable() said no, for the message of --device cuda


@functools.cache
def cuda_usable() -> bool:
    """True when CuPy imports and can allocate on a CUDA device."""
    global _cuda_error
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device is visible")
        cupy.zeros(1).sum().item()  # a driver or toolkit mismatch shows up only on first use
        return True
    except Exception as exc:  # ImportError, CUDARuntimeError, missing libraries...
        logger.debug("CUDA not usable: %s", exc)
        _cuda_error = exc
        return False


# --------------------------------------------------------------------------------------------------------------
# What to install when CUDA is not usable. A machine with only the NVIDIA driver needs CuPy with its [ctk] extra
# (NVRTC, cuBLAS, the CUDA headers... as pip wheels), which the cupaged[cuda12] / cupaged[cuda13] extras pull: the
# messages name the missing piece and the command for this machine.

_CUDA_LIBRARIES = ("nvrtc", "cublasLt", "cublas", "cudart", "curand", "cusparse", "cusolver", "cufft", "nvJitLink")
_SONAME = re.compile(r"lib(?:%s)[\w.+-]*?\.so(?:\.\d+)*" % "|".join(_CUDA_LIBRARIES))


def driver_cuda_major() -> int | None:
    """The newest CUDA major version the NVIDIA driver supports (12 for 12.4), None without a driver."""
    try:
        import cupy

        version = cupy.cuda.runtime.driverGetVersion()
        if version > 0:
            return version // 1000
    except Exception:
        pass
    try:  # without CuPy: ask the driver library itself
        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return version.value // 1000
    except Exception:
        pass
    return None


def cupy_cuda_major() -> int | None:
    """The CUDA major version of the installed CuPy wheel (cupy-cuda12x: 12), None if there is none."""
    from importlib import metadata

    for major in (13, 12, 11):
        try:
            metadata.version(f"cupy-cuda{major}x")
            return major
        except metadata.PackageNotFoundError:
            continue
    return None


def install_hint() -> str:
    """What to run to get CuPy and its CUDA libraries for this machine: for the CUDA of the installed CuPy,
    else for the driver's; a driver too old for the installed CuPy, or for any supported CUDA, is said so."""
    cupy_major, driver_major = cupy_cuda_major(), driver_cuda_major()
    if driver_major is not None and driver_major < 12:
        return (f"the NVIDIA driver supports CUDA {driver_major} only; cupaged needs a driver for CUDA 12 or 13 "
                "(update the driver)")
    if cupy_major is not None and cupy_major >= 12 and (driver_major is None or driver_major >= cupy_major):
        return f'pip install "cupaged[cuda{cupy_major}]"'
    if cupy_major is not None and driver_major is not None:
        return (f'pip uninstall cupy-cuda{cupy_major}x && pip install "cupaged[cuda{min(driver_major, 13)}]" '
                f"(CuPy for CUDA {cupy_major} is installed, the driver supports CUDA {driver_major})")
    if driver_major is not None:
        return f'pip install "cupaged[cuda{min(driver_major, 13)}]"'
    return ('pip install "cupaged[cuda12]" or "cupaged[cuda13]", matching the CUDA version of your NVIDIA driver '
            "(nvidia-smi shows it)")


def missing_library_message(library: str) -> str:
    """The error for a CUDA library (e.g. "cuBLAS (libcublas.so.12)") that cannot be loaded."""
    return (f"{library} not found: {install_hint()} (CuPy's [ctk] extra installs the CUDA libraries as pip wheels; "
            "no system CUDA toolkit is needed)")


def missing_library(exc: BaseException) -> str | None:
    """The CUDA library a load failure names (libnvrtc.so.12, ...), if it names one."""
    text = str(exc)
    m = _SONAME.search(text)
    if m:
        return m.group(0)
    return next((name for name in _CUDA_LIBRARIES if re.search(rf"\b{name}\b", text, re.IGNORECASE)), None)


def no_cuda_message(exc: BaseException | None) -> str:
    """Why --device cuda cannot be used (exc: what cuda_usable() ran into) and what to do about it."""
    if exc is None:
        return f"no usable CUDA device was found: {install_hint()}, or use --device cpu"
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) and (getattr(exc, "name", None) or "").split(".")[0] == "cupy":
        return f"CuPy is not installed: {install_hint()}, or use --device cpu"
    library = missing_library(exc)
    if library is not None:
        return f"{missing_library_message(library)}; or use --device cpu. ({detail})"
    if driver_cuda_major() is None:
        return (f"no NVIDIA driver was found (libcuda.so.1 cannot be loaded): install the NVIDIA driver, or use "
                f"--device cpu. ({detail})")
    if "InsufficientDriver" in str(exc) or "insufficient" in str(exc).lower():
        return f"the NVIDIA driver is too old for the installed CuPy: {install_hint()}, or use --device cpu. ({detail})"
    if "NoDevice" in str(exc) or "no CUDA device" in str(exc):
        return (f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                f"use --device cpu. ({detail})")
    return f"CUDA is not usable ({detail}): {install_hint()}, or use --device cpu"


def set_device(name: str | None) -> str:
    """Choose the device for this process: 'cpu', 'cuda', or None for automatic. Returns the choice."""
    global _chosen
    name = name or os.environ.get(ENV_VAR) or ("cuda" if cuda_usable() else "cpu")
    name = name.lower()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not cuda_usable():
        raise RuntimeError(f"device 'cuda' was asked for but {no_cuda_message(_cuda_error)}")
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
