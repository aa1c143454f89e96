"""Gradient checkpointing for the models: ``model.set_grad_checkpointing(True)``.

Checkpointed stages keep only their inputs during the forward pass and recompute their activations in
the backward pass, trading compute for memory. As in timm, BatchNorm layers inside a checkpointed
stage see the recomputation as a second training-mode call (their running statistics update twice).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run(module: nn.Module, *args, enabled: bool):
    """``module(*args)``, checkpointed when ``enabled`` and gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
