"""Stochastic depth (DropPath) for residual branches."""
from __future__ import annotations

import torch


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p`` (rescaled).

    Args:
        x: ``(B, ...)`` residual-branch output.
        p: drop probability in ``[0, 1]``; ``0`` or ``training=False`` returns ``x`` itself, ``1`` drops every
            sample.
        training: the module's training flag.

    Returns:
        ``x`` with each sample either zeroed or scaled by ``1 / (1 - p)``, same shape.
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask if keep == 0.0 else x * mask / keep
