"""Compiling the CUDA kernels in cuda/ with NVRTC through cupy.RawModule.

Kernels are C++ templates over the element type (and sizes known per model); each instantiation is compiled on
first use through `name_expressions`, for the current device's architecture (`-arch=sm_XY` from its compute
capability), and kept for the process (functools.cache on (file, names, options, arch)). CuPy keeps the compiled
binaries in its on-disk cache, keyed by the source text: so that an edit to a shared header reaches that key,
the loader inlines the repo's own `#include "..."` files (with `#line` markers, so NVRTC's messages still name
the right file and line). A compile error is raised as KernelCompileError naming the file, the instantiation
and NVRTC's log.

Sources are looked for in $CUPAGED_CUDA_DIR when set (kernel development: try an edited copy without touching
the tree), else in the repository's cuda/ directory, then in the package data directory cupaged/_cuda/.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

SOURCE_DIRS = [Path(__file__).resolve().parents[1] / "cuda", Path(__file__).resolve().parent / "_cuda"]
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
BASE_OPTIONS = ("--std=c++17",)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source."""


def cuda_dir() -> Path:
    """The directory holding the .cu sources: $CUPAGED_CUDA_DIR, the repo's cuda/, else cupaged/_cuda/."""
    override = os.environ.get("CUPAGED_CUDA_DIR")
    for d in ([Path(override)] if override else []) + SOURCE_DIRS:
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"cupaged's CUDA sources are missing (looked in {', '.join(map(str, SOURCE_DIRS))})")


def ctype(dtype: np.dtype) -> str:
    """The C++ element type of a dtype."""
    try:
        return CTYPES[np.dtype(dtype).name]
    except KeyError:
        raise TypeError(f"no CUDA kernels for dtype {np.dtype(dtype).name}") from None


def read_source(path: Path, _seen: frozenset = frozenset()) -> str:
    """The text of `path` with its local `#include "x"` files inlined once each, between #line markers."""
    if path in _seen:
        return ""
    seen = _seen | {path}
    out = [f'#line 1 "{path.name}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = _INCLUDE.match(line)
        included = path.parent / m.group(1) if m else None
        if included is not None and included.is_file():
            out.append(read_source(included, seen))
            out.append(f'#line {number + 1} "{path.name}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


@functools.cache
def device_arch() -> str:
    """'XY' for the current device's compute capability X.Y, capped at what this NVRTC can target."""
    import cupy

    arch = cupy.cuda.Device().compute_capability
    try:  # NVRTC older than the GPU: CuPy compiles for the newest arch it knows; do the same
        from cupy.cuda import compiler

        arch = min(arch, str(compiler._get_max_compute_capability()), key=int)
    except Exception:
        pass
    return arch


@functools.cache
def include_options() -> tuple[str, ...]:
    """-I options for the CUDA headers (cuda_fp16.h, cuda_bf16.h) when they are found; NVRTC has none built in."""
    dirs: list[str] = []
    try:
        import cupy

        path = cupy.cuda.get_cuda_path()
        if path:
            dirs.append(os.path.join(path, "include"))
    except Exception:
        pass
    try:  # CUDA from pip wheels (cupy-cudaXXx[ctk]): cuda-pathfinder knows where the headers went
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            dirs.append(str(found))
    except Exception:
        pass
    real = dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h")))
    return tuple(f"-I{d}" for d in real)


@functools.cache
def _module(filename: str, names: tuple[str, ...], options: tuple[str, ...], arch: str):
    import cupy

    path = cuda_dir() / filename
    source = read_source(path)
    opts = BASE_OPTIONS + options + (f"-arch=sm_{arch}",) + include_options()
    try:
        if arch[-1].isalpha():  # architecture-specific (sm_90a): RawModule would append CuPy's own -arch=sm_90
            return _ArchModule(source, opts, names)
        return cupy.RawModule(code=source, options=opts, name_expressions=list(names))
    except (cupy.cuda.compiler.CompileException, _NvrtcFailed) as exc:
        log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
        raise KernelCompileError(f"{path}: compiling {', '.join(names)} with {' '.join(opts)} failed:\n{log}"
                                 f"{_missing_headers_hint(log)}") from None
    except Exception as exc:  # NVRTC itself cannot be loaded: say which library and how to get it
        from cupaged.device import missing_library, missing_library_message

        library = missing_library(exc)
        if library is None:
            raise
        raise KernelCompileError(f"compiling {path.name}: {missing_library_message(f'NVRTC ({library})')} "
                                 f"({type(exc).__name__}: {exc})") from None


class _NvrtcFailed(Exception):
    """NVRTC rejected an architecture-specific compile; the message is its log."""


# What CuPy adds to each of its NVRTC compiles besides -arch, so both paths build the same code.
_CUPY_NVRTC_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")


class _ArchModule:
    """Kernels compiled by NVRTC for an architecture-specific target such as sm_90a (wgmma), loaded as a cubin.

    cupy.RawModule appends its own -arch=sm_XY (the device's plain target) after the caller's options, so these
    compile here, through CuPy's NVRTC binding, with exactly our options; CuPy's disk cache does not hold them
    (each process compiles them once)."""

    def __init__(self, source: str, options: tuple[str, ...], names: tuple[str, ...]) -> None:
        from cupy.cuda import function
        from cupy_backends.cuda.libs import nvrtc

        prog = nvrtc.createProgram(source, "cupaged_arch.cu", (), ())
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, list(options + _CUPY_NVRTC_OPTIONS))
            except nvrtc.NVRTCError:
                raise _NvrtcFailed(nvrtc.getProgramLog(prog)) from None
            self._lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
            cubin = nvrtc.getCUBIN(prog)
        finally:
            nvrtc.destroyProgram(prog)
        self._module = function.Module()
        self._module.load(cubin)

    def get_function(self, name: str) -> "_ArchFunction":
        return _ArchFunction(self._module.get_function(self._lowered[name]))


class _ArchFunction:
    """A kernel of an _ArchModule, called like a cupy.RawKernel: fn(grid, block, args, shared_mem=...)."""

    def __init__(self, function) -> None:
        self._function = function

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        self._function(grid, block, args, shared_mem=shared_mem)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        from cupy.cuda import driver

        return driver.funcGetAttribute(_MAX_DYNAMIC_SMEM, self._function.ptr)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, size: int) -> None:
        from cupy.cuda import driver

        driver.funcSetAttribute(self._function.ptr, _MAX_DYNAMIC_SMEM, size)


_MAX_DYNAMIC_SMEM = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


def _missing_headers_hint(log: str) -> str:
    """What to do when NVRTC's log says the CUDA headers our kernels include were not found ("" otherwise)."""
    if not re.search(r"cannot open source file \"?cuda_(fp16|bf16)\.h", log):
        return ""
    from cupaged.device import install_hint

    looked = ", ".join(opt[2:] for opt in include_options()) or "no CUDA include directory was found"
    return (f"\nThe CUDA headers (cuda_fp16.h, cuda_bf16.h) are missing (looked in: {looked}): {install_hint()} "
            "(CuPy's [ctk] extra brings them with the nvidia-cuda-runtime wheel), or set CUDA_PATH to a CUDA "
            "toolkit")


def module(filename: str, names: tuple[str, ...], options: tuple[str, ...] = (), arch: str | None = None):
    """The RawModule of cuda/`filename` with the template instantiations `names`, compiled once per process.

    arch: the target after 'sm_' when it is not the device's own, e.g. '90a' for wgmma (architecture-specific
    instructions run only on that exact compute capability: the caller checks the device).
    """
    return _module(filename, tuple(names), tuple(options), arch or device_arch())


@functools.cache
def kernel(filename: str, name: str, options: tuple[str, ...] = (), arch: str | None = None):
    """The compiled kernel `name` (e.g. 'rms_norm<__nv_bfloat16>') from cuda/`filename` (arch: see `module`)."""
    return module(filename, (name,), options, arch).get_function(name)
