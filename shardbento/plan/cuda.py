"""What a CUDA build of torch needs of its host: the NVIDIA driver for its CUDA version, and GPUs new
enough for its kernels. Read from an image's lock, the driver and /proc; no torch import."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

# The oldest Linux driver that runs each CUDA major (minor versions run on it by CUDA's minor version
# compatibility); torch's CUDA wheels bring their own runtime, so the driver is all the host provides.
DRIVER_FLOORS = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
# The oldest compute capability each CUDA major builds kernels for (CUDA 13 dropped Maxwell, Pascal and
# Volta: a V100 needs a CUDA 12 build).
MIN_CAPABILITY = {13: (7, 5), 12: (5, 0), 11: (3, 5)}
# Where torch's CUDA 12 wheels are: `make cuda-lock TORCH_INDEX=...` locks an image against it.
CUDA12_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
_RUNTIME = re.compile(r"^nvidia-cuda-runtime(?:-cu(\d+))?==(\d+)\.(\d+)", re.MULTILINE)


def lock_cuda(lock: Path) -> tuple[int, int] | None:
    """The CUDA version of the runtime a lock installs (nvidia-cuda-runtime[-cuNN]==X.Y...)."""
    match = _RUNTIME.search(lock.read_text()) if lock.is_file() else None
    return (int(match[2]), int(match[3])) if match else None


def parse_cuda(version: str | None) -> tuple[int, int] | None:
    """torch.version.cuda ("13.0") as a tuple; None for a CPU build."""
    if not version:
        return None
    major, _, minor = version.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA the loaded NVIDIA driver supports (cuDriverGetVersion); None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or not version.value:
        return None
    return version.value // 1000, version.value % 1000 // 10


def driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel module's version ("550.54.14"), as the NVIDIA driver reports it; None without one."""
    try:
        match = re.search(r"Kernel Module\s+(\d+(?:\.\d+)+)", proc.read_text())
    except OSError:
        return None
    return match[1] if match else None


def driver_refusal(
    build: tuple[int, int] | None, supported: tuple[int, int] | None, driver: str | None
) -> str | None:
    """Why a torch built for CUDA `build` cannot run on a driver that supports CUDA `supported`, with the
    fix (the driver floor, or the CUDA 12 wheel index to lock the image against); None when it can."""
    if build is None or supported is None or supported[0] >= build[0]:
        return None
    floor = DRIVER_FLOORS.get(build[0], "a newer one")
    have = f"driver {driver}" if driver else "the NVIDIA driver"
    fix = f"upgrade the host's driver to {floor} or later"
    if build[0] > 12 >= supported[0]:
        fix += (
            f", or build the image from torch's CUDA 12 wheels: make cuda-lock TORCH_INDEX={CUDA12_TORCH_INDEX}"
            " (then make bento)"
        )
    return (
        f"this torch is a CUDA {build[0]}.{build[1]} build, which needs an NVIDIA driver >= {floor}; "
        f"{have} supports CUDA {supported[0]}.{supported[1]} only, so torch sees no GPU: {fix}"
    )


def capability_refusal(gpu: str, capability: tuple[int, int], build: tuple[int, int] | None) -> str | None:
    """Why a CUDA `build` has no kernels for a GPU of this compute capability; None when it has."""
    if build is None:
        return None
    oldest = MIN_CAPABILITY.get(build[0])
    if oldest is None or capability >= oldest:
        return None
    fix = "use a GPU of that capability or later"
    if build[0] > 12 and capability >= MIN_CAPABILITY[12]:
        fix = f"build the image from torch's CUDA 12 wheels (make cuda-lock TORCH_INDEX={CUDA12_TORCH_INDEX}) or {fix}"
    return (
        f"{gpu} (compute capability {capability[0]}.{capability[1]}) is older than a CUDA "
        f"{build[0]}.{build[1]} build has kernels for ({oldest[0]}.{oldest[1]} and later): {fix}"
    )
