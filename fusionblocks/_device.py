"""What machine this is, in words: device names (CPU model or GPU), their file-name form, Triton's version."""
from __future__ import annotations

import os
import platform
import re
from typing import Dict, Optional, Union

import torch

__all__ = ["cpu_name", "device_name", "device_slug", "triton_version"]


def triton_version() -> Optional[str]:
    """Triton's version, ``None`` when it is not installed."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def cpu_name(cpuinfo: Optional[str] = None, cores: Optional[int] = None) -> str:
    """``"CPU <model name> (family F model M, <n> cores)"``: family and model where ``/proc/cpuinfo`` gives them
    (x86). A virtual machine's model name can be as bare as ``AMD EPYC`` for CPUs of different generations
    (AVX2-only and AVX-512 ones among them); the numbers tell them apart.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read from the file when ``None``).
        cores: the core count to name (``os.cpu_count()`` when ``None``).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model_name = fields.get("model name") or platform.processor() or platform.machine()
    details = []
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    if family.isdigit() and model.isdigit():
        details.append(f"family {family} model {model}")
    details.append(f"{os.cpu_count() if cores is None else cores} cores")
    return f"CPU {model_name} ({', '.join(details)})"


def device_name(device: Union[torch.device, str]) -> str:
    """``"NVIDIA H100 80GB HBM3"``-style name of a CUDA device; :func:`cpu_name` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(name: Union[str, torch.device]) -> str:
    """File-name form of a device name (or of a device's :func:`device_name`):
    ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    if isinstance(name, torch.device):
        name = device_name(name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
