"""The transformer's building blocks.

`reference` holds every op written with array-module-agnostic NumPy-style code: it runs on NumPy arrays on
the CPU and on CuPy arrays on the GPU, and it is the oracle each CUDA kernel is tested against. `cuda_ops`
holds the same ops as CUDA kernels. `ops_for` picks one set; nothing else does.
"""

from __future__ import annotations

from types import ModuleType


def ops_for(device: str) -> ModuleType:
    """The op set for a device: CUDA kernels on 'cuda', the NumPy reference on 'cpu'."""
    if device == "cuda":
        from cupaged.layers import cuda_ops

        return cuda_ops
    from cupaged.layers import reference

    return reference
