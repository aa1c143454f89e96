"""The functional layer: attention ops with a plain-PyTorch reference and fast backends.

``decay_attention`` and ``window_attention`` validate their arguments, then run on the backend chosen
by :mod:`fusionblocks.ops.dispatch`: ``backend=None`` runs the reference unless a fast path is measured
(once per call class, cached per machine; :mod:`fusionblocks.ops.autotune`) or known by a calibrated
rule to be faster; env ``FUSIONBLOCKS_BACKEND`` forces one; naming one that cannot run raises with every
candidate's reasons. :func:`explain` lists each backend's reasons for a call, :func:`choose` says which
backend the automatic choice picks for it and why.
"""
from . import autotune, flops, reference
from .autotune import Choice, clear_cache
from .decay import decay_attention
from .dispatch import BACKENDS, BackendUnavailable, choose, explain, load_backends, select
from .window import window_attention

load_backends()
try:  # read the per-machine cache now, so that nothing is read from disk while torch.compile traces a call
    autotune.load_cache()
except ValueError:  # a bad FUSIONBLOCKS_AUTOTUNE value is reported by the first call that needs it
    pass

__all__ = ["decay_attention", "window_attention", "reference", "explain", "choose", "select", "Choice",
           "clear_cache", "BACKENDS", "BackendUnavailable", "load_backends"]
