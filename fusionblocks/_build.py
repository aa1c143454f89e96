"""What ``setup.py`` built: the note it writes next to ``fusionblocks._C`` (``_C_build.json``).

``pip -q`` hides the build's output when the build succeeds, so a CUDA build that could not be configured or
failed (and fell back to the CPU-only extension) would go unnoticed; the note carries the reason to run time,
where the ``cuda`` backend's reasons (``fusionblocks.ops.explain``, ``fusionblocks info``) include it
(``fusionblocks.ops.cuda`` reads it once, at import).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

NOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")


def build_note() -> Optional[Dict[str, Any]]:
    """The note of the last build of ``fusionblocks._C`` (``built``, ``cuda``, ``cuda_note``, ``error``,
    ``torch``), or ``None`` when there is none (an extension built before the note existed, or copied in)."""
    try:
        with open(NOTE) as f:
            note = json.load(f)
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def why_no_cuda() -> str:
    """``" (the build's reason)"`` when the last build left the CUDA kernels out, else ``""``."""
    note = build_note()
    if note and not note.get("cuda") and note.get("cuda_note"):
        return f" ({note['cuda_note']})"
    return ""
