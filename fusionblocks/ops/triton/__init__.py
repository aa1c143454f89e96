"""Triton backends. Importing this module registers them with :mod:`fusionblocks.ops.dispatch`.

Raises ImportError when Triton is not installed; dispatch then reports that as the reason.
"""
import triton  # noqa: F401  (absence is reported by dispatch as the reason this backend cannot run)

from . import decay, window  # noqa: F401,E402
