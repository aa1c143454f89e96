"""What machine this is, in words: device names (CPU model or GPU), their file-name form, Triton's version."""
from __future__ import annotations

import os
import platform
import re
from typing import Dict, Optional, Union

import torch

__all__ = ["cpu_name", "device_name", "device_slug", "resolve_device", "triton_version"]


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


def _device_count(kind: str) -> int:
    """How many devices of type ``kind`` (``"cuda"``, ``"mps"``, ``"xpu"``...) torch can use here."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    acc = torch.accelerator.current_accelerator(check_available=True)
    return torch.accelerator.device_count() if acc is not None and acc.type == kind else 0


def resolve_device(requested: Union[str, torch.device, None], index: int = 0, option: str = "--device") -> torch.device:
    """The device a ``--device`` option (or a ``device=`` argument) names, checked against this machine: the one
    check behind every command's ``--device``.

    ``None`` or ``""``: ``cuda:<index>`` when CUDA is available (``index``: the process's local rank in a
    distributed run), else the CPU. Another accelerator torch supports (``mps``, ``xpu``) is taken when named and
    present.

    Raises:
        ValueError: naming ``option``, for a string that is not a device (``"gpu"``), a device type this machine
            has none of (``"cuda"`` on a CPU-only machine), or an index past its device count (``"cuda:3"`` with
            one GPU).
    """
    if requested is None or requested == "":
        return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {requested!r} is not a device: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    count = _device_count(dev.type)
    if count == 0:
        build = f", CUDA build: {torch.version.cuda or 'none'}" if dev.type == "cuda" else ""
        raise ValueError(f"{option} {requested}: no {dev.type.upper()} device here (torch {torch.__version__}{build}); "
                         f"use {option} cpu")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{option} {requested}: this machine has {count} {dev.type.upper()} device(s), "
                         f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


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
