"""What machine this is, in words: device names (CPU model or GPU), their file-name form, Triton's version."""
from __future__ import annotations

import os
import platform
import re
from typing import Optional, Union

import torch

__all__ = ["device_name", "device_slug", "triton_version"]


def triton_version() -> Optional[str]:
    """Triton's version, ``None`` when it is not installed."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _cpu_model() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_name(device: Union[torch.device, str]) -> str:
    """``"NVIDIA H100 80GB HBM3"``-style name of a CUDA device; ``"CPU <model name> (<n> cores)"`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({os.cpu_count()} cores)"


def device_slug(name: Union[str, torch.device]) -> str:
    """File-name form of a device name (or of a device's :func:`device_name`):
    ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    if isinstance(name, torch.device):
        name = device_name(name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
