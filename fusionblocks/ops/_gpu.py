"""What a CUDA device allows one thread block: the shared-memory limits the GPU backends fit their configurations to.

Shared by the Triton and CUDA backends (no Triton import here). A present device is asked; a
cross-compile, which has none, uses :data:`SHARED_BYTES_BY_CAPABILITY`.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

__all__ = ["SHARED_BYTES_BY_CAPABILITY", "DEFAULT_SHARED_BYTES", "shared_bytes_of_capability", "max_shared_bytes"]

SHARED_BYTES_BY_CAPABILITY = {
    (7, 5): 64 * 1024,    # T4, RTX 20xx
    (8, 0): 163 * 1024,   # A100, A30
    (8, 6): 99 * 1024,    # A10, A40, RTX 30xx
    (8, 7): 163 * 1024,   # Jetson Orin
    (8, 9): 99 * 1024,    # L4, L40, RTX 40xx
    (9, 0): 227 * 1024,   # H100, H200
    (10, 0): 227 * 1024,  # B200
    (12, 0): 99 * 1024,   # RTX 50xx
}
"""Shared memory one block may use with the opt-in attribute (``cudaDevAttrMaxSharedMemoryPerBlockOptin``),
in bytes, by compute capability, from NVIDIA's CUDA C++ Programming Guide (compute capabilities table)."""

DEFAULT_SHARED_BYTES = 48 * 1024
"""What any CUDA GPU grants a block without opting in: the limit assumed for an unknown capability."""


def shared_bytes_of_capability(capability: Union[int, Tuple[int, int]]) -> int:
    """Opt-in shared memory per block of a compute capability (``(9, 0)`` or ``90``); 48 KB when unknown."""
    if isinstance(capability, int):
        capability = divmod(capability, 10)
    return SHARED_BYTES_BY_CAPABILITY.get(tuple(capability), DEFAULT_SHARED_BYTES)


def max_shared_bytes(device) -> int:
    """Shared memory a kernel may use per block on CUDA ``device``, in bytes.

    The device's own opt-in limit (``torch.cuda.get_device_properties(device).shared_memory_per_block_optin``,
    the number Triton checks before a launch) where torch reports it, else
    :data:`SHARED_BYTES_BY_CAPABILITY` by the device's compute capability.
    """
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return shared_bytes_of_capability((props.major, props.minor))
