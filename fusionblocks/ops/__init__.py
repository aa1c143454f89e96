"""The functional layer: attention ops with a plain-PyTorch reference and fast backends.

``decay_attention`` and ``window_attention`` validate their arguments, then run on the backend chosen
by :mod:`fusionblocks.ops.dispatch` (``backend=None`` picks the fastest that can run; env
``FUSIONBLOCKS_BACKEND`` overrides; naming one that cannot run raises with every candidate's reasons).
"""
from . import reference
from .decay import decay_attention
from .dispatch import BACKENDS, BackendUnavailable, explain, load_backends, select
from .window import window_attention

load_backends()

__all__ = ["decay_attention", "window_attention", "reference", "explain", "select", "BACKENDS", "BackendUnavailable", "load_backends"]
