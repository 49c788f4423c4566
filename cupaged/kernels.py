"""Compiling the CUDA kernels in cuda/ with NVRTC through cupy.RawModule.

Kernels are C++ templates over the element type (and sizes known per model); each instantiation is compiled
on first use through `name_expressions` for the current device's architecture (CuPy picks it and keeps
compiled binaries in its on-disk cache) and kept for the process. A compile error names the file and carries
NVRTC's log, whose lines give the line numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SOURCE_DIRS = [Path(__file__).resolve().parents[1] / "cuda", Path(__file__).resolve().parent / "_cuda"]
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source."""


def cuda_dir() -> Path:
    for d in SOURCE_DIRS:
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"cupaged's CUDA sources are missing (looked in {', '.join(map(str, SOURCE_DIRS))})")


def ctype(dtype: np.dtype) -> str:
    """The C++ element type of a dtype."""
    try:
        return CTYPES[np.dtype(dtype).name]
    except KeyError:
        raise TypeError(f"no CUDA kernels for dtype {np.dtype(dtype).name}") from None


@functools.cache
def kernel(filename: str, name: str):
    """The compiled kernel `name` (e.g. 'rms_norm<__nv_bfloat16>') from cuda/`filename`."""
    import cupy

    directory = cuda_dir()
    source = (directory / filename).read_text()
    try:
        module = cupy.RawModule(code=source, options=("--std=c++17", f"-I{directory}"), name_expressions=[name])
        return module.get_function(name)
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"{directory / filename}: compiling {name} failed:\n{exc}") from None
