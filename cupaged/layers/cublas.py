"""GEMMs through a cuBLAS handle of our own, opened with ctypes, so that CUDA graphs can capture them.

CuPy's matmul cannot be captured: every CuPy cuBLAS wrapper calls `setStream`, which refuses to run during stream
capture. A handle of our own can be, provided (cuBLAS docs, "CUDA graphs support") it is bound to the capturing
stream and given a workspace of ours *before* the capture starts: inside a capture cuBLAS may not allocate.
`cublasSetStream` resets the workspace, so the two are always set together. ../shared/DEVICE_NOTES.md records the
measurement this design rests on. One handle per device; every GEMM of the model goes through it, eager or
captured, so the two compute the same thing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import cupy
import numpy as np

from cupaged.device import cupy_cuda_major, lasting_empty, missing_library_message

Array = Any

_CUDA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType_t
_COMPUTE_32F = 68          # cublasComputeType_t CUBLAS_COMPUTE_32F: fp32 accumulation, no TF32
_OP_N, _OP_T = 0, 1        # cublasOperation_t CUBLAS_OP_N, CUBLAS_OP_T
_GEMM_DEFAULT = -1         # cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT
WORKSPACE_BYTES = 32 << 20  # what cuBLAS recommends for Hopper


def load_library(lib: str = "cublas", label: str = "cuBLAS") -> ctypes.CDLL:
    """The library `lib` (cublas, cublasLt) that CuPy uses (found by cuda-pathfinder, which ships with CuPy 14),
    else the system's; `label` names it in the error that says how to install it."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib(lib).abs_path)
    except Exception:  # older CuPy, or the library is only on the loader's path
        pass
    for name in (f"lib{lib}.so.13", f"lib{lib}.so.12", f"lib{lib}.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    major = cupy_cuda_major()  # the CUDA of the installed CuPy wheel: the library it needs
    raise RuntimeError(missing_library_message(f"{label} (lib{lib}.so.{major or '*'})"))


class Cublas:
    """One cuBLAS handle with its own workspace, bound to whichever stream issues the next GEMM."""

    def __init__(self) -> None:
        self.lib = load_library()
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = lasting_empty(WORKSPACE_BYTES, np.uint8)  # kept for the process: not from a graph's pool
        self.stream: int | None = None
        gemm = self.lib.cublasGemmEx
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        gemm.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32, i32, i32, i32]
        gemm.restype = i32
        self._gemm = gemm
        self._one = ctypes.c_float(1.0)
        self._zero = ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def bind(self, stream_ptr: int) -> None:
        """Issue the following GEMMs on this stream (call before a capture on it begins)."""
        if stream_ptr != self.stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                       ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
            self.stream = stream_ptr

    def matmul(self, a: Array, b: Array, out: Array, b_transposed: bool = False) -> Array:
        """out [M, N] = a [M, K] @ b [K, N], row-major; a's and out's rows may be strided, b is contiguous.
        With `b_transposed`, b is [N, K] and the product is a @ b^T (a dequantized GGUF weight's layout).

        cuBLAS is column-major: the row-major product is out^T = b^T a^T, which is what is asked for.
        """
        m, k = a.shape
        n = b.shape[0] if b_transposed else b.shape[1]
        self.bind(cupy.cuda.get_current_stream().ptr)
        lda = a.strides[0] // a.itemsize
        self._check(self._gemm(self.handle, _OP_T if b_transposed else _OP_N, _OP_N, n, m, k,
                               ctypes.addressof(self._one),
                               b.data.ptr, _CUDA_TYPES[b.dtype.name], k if b_transposed else n,
                               a.data.ptr, _CUDA_TYPES[a.dtype.name], lda,
                               ctypes.addressof(self._zero), out.data.ptr, _CUDA_TYPES[out.dtype.name],
                               out.strides[0] // out.itemsize, _COMPUTE_32F, _GEMM_DEFAULT), "cublasGemmEx")
        return out


@functools.cache
def _handle(device_id: int) -> Cublas:
    return Cublas()


def handle() -> Cublas:
    """The current device's handle."""
    return _handle(cupy.cuda.Device().id)


def supported(a: Array, b: Array, out_dtype: np.dtype, b_transposed: bool = False) -> bool:
    """True when the GEMM fits cublasGemmEx as used here (else the caller uses CuPy's matmul); b is [N, K] with
    `b_transposed`, else [K, N]."""
    if b_transposed:
        b = b.T  # the [K, N] shape the checks below read; its contiguity is b's own
        contiguous = b.flags.f_contiguous
    else:
        contiguous = b.flags.c_contiguous
    return (a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0] and a.dtype == b.dtype and contiguous
            and a.dtype.name in _CUDA_TYPES and np.dtype(out_dtype).name in (a.dtype.name, "float32")
            and a.strides[1] == a.itemsize and a.strides[0] % a.itemsize == 0 and a.strides[0] >= a.shape[1] * a.itemsize
            and a.shape[0] > 0 and b.shape[1] > 0 and a.shape[1] > 0)
