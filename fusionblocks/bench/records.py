"""The record format of every benchmark (issue 3's fields plus optional derived ones), checked with jsonschema."""
from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional, Union

import torch

from .._device import device_name, device_slug, triton_version  # noqa: F401  (re-exported)


PASSES = ("fwd", "fwd+bwd")
ANCHORS = ("sdpa", "flex", "compiled")
AUTO = "auto"  # the implementation name of whatever ``backend=None`` picks
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_OPTIONAL_NUMBER = {"type": ["number", "null"], "minimum": 0}

RECORD_SCHEMA = {
    "type": "object",
    "required": ["op", "impl", "shape", "dtype", "pass", "ms", "peak_mem_mb", "device", "torch", "triton"],
    "properties": {
        "op": {"type": "string"},
        "impl": {"type": "string"},
        "shape": {"type": "object"},
        "dtype": {"type": "string", "enum": ["float32", "bfloat16", "float16"]},
        "pass": {"type": "string", "enum": ["fwd", "fwd+bwd", "train"]},
        "ms": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "peak_mem_mb": {"type": ["number", "null"], "minimum": 0},
        "device": {"type": "string"},
        "torch": {"type": "string"},
        "triton": {"type": ["string", "null"]},
        "error": {"type": "string", "minLength": 1},
        "img_per_s": {"type": "number", "exclusiveMinimum": 0},
        "max_abs_err": _OPTIONAL_NUMBER,
        "tflops": _OPTIONAL_NUMBER,
        "pct_of_dense_bf16_peak": _OPTIONAL_NUMBER,
        "io_mb": _OPTIONAL_NUMBER,
        "gbps": _OPTIONAL_NUMBER,
        "hbm_share": _OPTIONAL_NUMBER,
        "threads": {"type": "integer", "minimum": 1},
        "isa": {"type": "string", "minLength": 1},
        "chosen": {"type": "string", "minLength": 1},
        "compile_s": _OPTIONAL_NUMBER,
        "grad_rel_err": _OPTIONAL_NUMBER,
        "grad_err_ratio": _OPTIONAL_NUMBER,
    },
    "additionalProperties": False,
    # a failed run carries its error and no measurement; a measured one has a time and no error
    "if": {"required": ["error"]},
    "then": {"properties": {"ms": {"type": "null"}, "peak_mem_mb": {"type": "null"}}},
    "else": {"properties": {"ms": {"type": "number"}}},
}
RECORDS_SCHEMA = {"type": "array", "items": RECORD_SCHEMA}


def isa_variant() -> str:
    """The instruction-set variant the ``cpp`` kernels run (``fusionblocks.ops.cpp.current_isa()``), ``"n/a"``
    when the extension or that function is absent."""
    try:
        from ..ops import cpp

        fn = getattr(cpp, "current_isa", None)
        return str(fn()) if callable(fn) and cpp.available() else "n/a"
    except Exception:  # an unbuilt or broken extension: nothing to name
        return "n/a"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def make_record(op: str, impl: str, shape: Mapping, dtype: Union[torch.dtype, str], pass_: str, ms: Optional[float],
                peak_mem_mb: Optional[float], device: Union[str, torch.device], *, error: Optional[str] = None,
                **extra) -> dict:
    """One record in issue 3's format. With ``error`` (the run raised) ``ms`` and ``peak_mem_mb`` are ``None``.
    CPU records also carry ``threads`` (intra-op threads) and ``isa`` (:func:`isa_variant`)."""
    rec = {
        "op": op,
        "impl": impl,
        "shape": dict(shape),
        "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype,
        "pass": pass_,
        "ms": None if ms is None else float(ms),
        "peak_mem_mb": None if peak_mem_mb is None else round(float(peak_mem_mb), 3),
        "device": device if isinstance(device, str) else device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
    }
    if rec["device"].startswith("CPU"):
        rec.update(threads=torch.get_num_threads(), isa=isa_variant())
    if error is not None:
        rec.update(ms=None, peak_mem_mb=None, error=error)
    rec.update(extra)
    return rec


def error_text(e: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), as stored in a record's ``error``."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def write_json(records: List[dict], path: str) -> None:
    """The one record writer: validate, then write ``path`` (folders created)."""
    validate_records(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def require_validator() -> None:
    """Raise the ``RuntimeError`` that :func:`write_json` would raise for a missing ``jsonschema``, before a run
    spends its time: a benchmark that writes its records only at the end checks this first (a GPU image
    without jsonschema would otherwise lose every measurement at the write)."""
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        raise RuntimeError("writing bench records needs jsonschema to check them: pip install 'fusionblocks[bench]' "
                           "(or pip install jsonschema)") from None


def validate_records(records: object) -> None:
    """Raise ``ValueError`` naming the first record (and field) that breaks :data:`RECORD_SCHEMA`.

    Checked with ``jsonschema`` (in the ``bench`` and ``test`` extras; imported only here, so timing
    and printing work without it).
    """
    require_validator()
    import jsonschema
    validator = jsonschema.Draft202012Validator(RECORDS_SCHEMA)
    errors = sorted(validator.iter_errors(records), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = list(e.absolute_path)
        if not where:
            raise ValueError(f"bench records: {e.message}")
        field_ = f" field {'.'.join(map(str, where[1:]))}" if len(where) > 1 else ""
        raise ValueError(f"bench record {where[0]}{field_}: {e.message}")
