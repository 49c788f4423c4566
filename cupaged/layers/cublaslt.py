"""FP8 GEMMs through cuBLASLt, opened with ctypes like layers/cublas.py's handle, so that CUDA graphs capture them.

cublasLtMatmul takes its stream and workspace with every call, so nothing is bound before a capture; what a
capture must not do is allocate (the workspace is ours, allocated once) or query heuristics for a new shape on a
path that differs from the eager one: each shape's descriptors and algorithm are made once and cached, and the
eager warm-up and the captured step make the same calls.

FP8 on Hopper wants the "TN" format: both operands K-major. cuBLASLt is column-major, so the row-major product
out[M, N] = x[M, K] @ w[N, K]^T is computed as out^T = op(A) @ B with A = w (its row-major [N, K] is a
column-major [K, N], transposed by the op), B = x (row-major [M, K] = column-major [K, M]), D = out
(column-major [N, M]). Leading dimensions of e4m3 operands must be multiples of 16 bytes: K % 16 == 0.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import cupy
import numpy as np

from cupaged.device import lasting_empty
from cupaged.layers.cublas import load_library

Array = Any

_R_8F_E4M3, _R_32F = 28, 0                                     # cudaDataType_t
_OUT_TYPES = {"float16": 2, "bfloat16": 14}                     # cudaDataType_t of the output
_COMPUTE_32F = 68                                               # cublasComputeType_t
_DESC_TRANSA, _DESC_TRANSB = 3, 4                               # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE_BYTES = 1                                   # cublasLtMatmulPreferenceAttributes_t
_OP_N, _OP_T = 0, 1
WORKSPACE_BYTES = 32 << 20
# The GEMM's alpha: codes' products are up to 448^2, and sums of K of them must stay finite in an fp16 output;
# a power of two, so the scaling back (cuda/fp8_quant.cu's scale_fp8_output, by 2^16) is exact.
ALPHA = 2.0 ** -16


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: the algorithm (cublasLtMatmulAlgo_t, 8 uint64), its workspace, status."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class _Plan:
    """The matmul descriptor, the four layouts and the chosen algorithm of one (M, N, K, output dtype)."""

    def __init__(self, lt: "CublasLt", m: int, n: int, k: int, out_type: int):
        lib, vp = lt.lib, ctypes.c_void_p
        self.desc, self.a, self.b, self.d = vp(), vp(), vp(), vp()
        lt.check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            lt.check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.c_size_t(4)),
                     "DescSetAttribute")
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        for layout, dtype, rows, cols in ((self.a, _R_8F_E4M3, k, n), (self.b, _R_8F_E4M3, k, m),
                                          (self.d, out_type, n, m)):
            lt.check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, u64(rows), u64(cols), i64(rows)),
                     "MatrixLayoutCreate")
        pref = vp()
        lt.check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        limit = ctypes.c_uint64(WORKSPACE_BYTES)
        lt.check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(limit),
                                                          ctypes.c_size_t(8)), "PreferenceSetAttribute")
        self.result, found = HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(lt.handle, self.desc, self.a, self.b, self.d, self.d, pref, 1,
                                                    ctypes.byref(self.result), ctypes.byref(found))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != 0 or found.value == 0:
            raise RuntimeError(f"cuBLASLt has no FP8 algorithm for M={m}, N={n}, K={k} on this GPU "
                               f"(status {status}); FP8 GEMMs need compute capability 8.9 or newer")


class CublasLt:
    """One cuBLASLt handle, its workspace and the plans of the shapes seen so far."""

    def __init__(self) -> None:
        self.lib = load_library("cublasLt", "cuBLASLt")  # beside the cuBLAS CuPy uses
        self.handle = ctypes.c_void_p()
        self.check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = lasting_empty(WORKSPACE_BYTES, np.uint8)  # kept for the process: not from a graph's pool
        vp = ctypes.c_void_p
        self.lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.c_size_t,
                                            vp]
        self.lib.cublasLtMatmul.restype = ctypes.c_int
        self._alpha, self._beta = ctypes.c_float(ALPHA), ctypes.c_float(0.0)
        self._plans: dict[tuple[int, int, int, int], _Plan] = {}

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt {what} failed with status {status}")

    def matmul_fp8(self, x_codes: Array, w_codes: Array, out: Array) -> Array:
        """out [M, N] = ALPHA * decode(x_codes [M, K]) @ decode(w_codes [N, K])^T (e4m3 codes as uint8, both
        C-contiguous; out contiguous float16/bfloat16), on the current stream."""
        (m, k), n = x_codes.shape, w_codes.shape[0]
        out_type = _OUT_TYPES[out.dtype.name]
        key = (m, n, k, out_type)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self, m, n, k, out_type)
        vp = ctypes.c_void_p
        self.check(self.lib.cublasLtMatmul(
            self.handle, plan.desc, ctypes.addressof(self._alpha), vp(w_codes.data.ptr), plan.a,
            vp(x_codes.data.ptr), plan.b, ctypes.addressof(self._beta), vp(out.data.ptr), plan.d,
            vp(out.data.ptr), plan.d, ctypes.addressof(plan.result.algo), vp(self.workspace.data.ptr),
            WORKSPACE_BYTES, vp(cupy.cuda.get_current_stream().ptr)), "cublasLtMatmul")
        return out


@functools.cache
def _handle(device_id: int) -> CublasLt:
    return CublasLt()


def handle() -> CublasLt:
    """The current device's cuBLASLt handle."""
    return _handle(cupy.cuda.Device().id)
