"""Every CUDA source compiles for sm_90 with nvcc, where nvcc exists (no GPU needed).

CUPAGED_NVCC_CHECK turns on explicit template instantiations at the end of each file, so the templates are
compiled too (at run time NVRTC instantiates them through name_expressions).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_for_sm90(source: Path, tmp_path: Path) -> None:
    # *_sm90.cu use Hopper's architecture-specific instructions (wgmma): they build for sm_90a only
    arch = "-gencode=arch=compute_90a,code=sm_90a" if source.stem.endswith("_sm90") else "-arch=sm_90"
    result = subprocess.run(["nvcc", arch, "--std=c++17", "-DCUPAGED_NVCC_CHECK", "-ptx", str(source),
                             "-o", str(tmp_path / "o.ptx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
