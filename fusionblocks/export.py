"""Export a model to ONNX or to a ``torch.export`` program (``.pt2``) and check the file against PyTorch.

Under ``torch.export`` (and so under ``torch.onnx.export(..., dynamo=True)``) the automatic backend choice
of every op is the reference (see :func:`fusionblocks.ops.dispatch.select`): the exported graph holds only
standard ATen / ONNX operators, so an ``.onnx`` file runs in ONNX Runtime with no PyTorch, and a ``.pt2``
program loads with ``torch.export.load`` without fusionblocks' compiled extension. A backend named
explicitly (``backend=`` or ``FUSIONBLOCKS_BACKEND``) is still honoured and then appears in the graph.

Both formats get a dynamic batch axis and carry the preprocessing a caller needs (model, class names,
image size, channels, mean/std) as JSON: in the ONNX file's ``metadata_props`` under ``fusionblocks``,
in the ``.pt2`` archive as the extra file ``fusionblocks.json``. :func:`read_metadata` reads either.

``fusionblocks export`` (:func:`add_cli_commands`) builds the model from a training checkpoint or with
fresh weights, exports, runs the file on a random batch and prints the error against PyTorch.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

FORMATS = ("onnx", "pt2")
METADATA_KEY = "fusionblocks"
PT2_METADATA_FILE = "fusionblocks.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# fp32 parity the check demands of an exported file (max |exported - eager| / max |eager|)
TOLERANCE = 1e-4

__all__ = [
    "FORMATS", "ExportError", "ExportResult", "export_model", "check_exported", "read_metadata",
    "load_for_export", "add_cli_commands",
]


class ExportError(ValueError):
    """A user error while building or exporting a model (wrong checkpoint, bad sizes, missing package)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    seconds: float
    max_abs_error: float
    max_rel_error: float
    batch: int

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= TOLERANCE


def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: install them with `pip install 'fusionblocks[export]'`"
        )


def _dynamic_batch() -> Tuple[Dict[int, object]]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _example(in_chans: int, image_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, image_size, image_size, generator=g)


def export_model(model: nn.Module, path: str | Path, *, format: str, image_size: int, in_chans: int = 3,
                 metadata: Optional[Dict[str, object]] = None) -> float:
    """Export ``model``, in eval mode, to ``path``; returns the export time in seconds. The model is left in the
    mode it was given in (a model in training is exported as for inference and goes on training).

    Args:
        model: any fusionblocks model (or module taking ``(B, in_chans, H, W)``).
        path: the output file.
        format: ``"onnx"`` or ``"pt2"``.
        image_size: side of the example input the export traces with (the batch axis stays dynamic).
        in_chans: channels of the example input.
        metadata: JSON-serializable preprocessing facts stored in the file (see :func:`read_metadata`).
    """
    if format not in FORMATS:
        raise ExportError(f"export: expected format one of {list(FORMATS)}, got {format!r}")
    if format == "onnx":
        _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = _example(in_chans, image_size)
    meta = json.dumps(metadata or {})
    # the exporter logs every torchvision op it skips when torchvision is absent: not about this model
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation chatter, not about this model
            if format == "onnx":
                program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_dynamic_batch(),
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
                program.model.metadata_props[METADATA_KEY] = meta
                program.save(str(path))
            else:
                program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch())
                torch.export.save(program, str(path), extra_files={PT2_METADATA_FILE: meta})
    finally:
        registry_log.setLevel(level)
        model.train(was_training)
    return time.perf_counter() - t0


def read_metadata(path: str | Path) -> Dict[str, object]:
    """The fusionblocks metadata stored in an exported ``.onnx`` or ``.pt2`` file (``{}`` when absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".pt2":
        extra = {PT2_METADATA_FILE: ""}
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra[PT2_METADATA_FILE] or "{}")
    _require_onnx()
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    return json.loads(props.get(METADATA_KEY, "{}"))


def run_exported(path: str | Path, format: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x``: ONNX Runtime (CPU) for ``onnx``, ``torch.export.load`` for ``pt2``."""
    if format == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(x)


def check_exported(path: str | Path, format: str, model: nn.Module, *, image_size: int, in_chans: int = 3,
                   batch: int = 3, seed: int = 1) -> Tuple[float, float]:
    """``(max abs error, max rel error)`` of the exported file against eager ``model`` on a random batch.

    The batch size differs from the one the export traced with (2), so the dynamic batch axis is exercised.
    """
    x = _example(in_chans, image_size, batch, seed)
    with torch.no_grad():
        ref = model.eval()(x).float()
    out = run_exported(path, format, x).float()
    if out.shape != ref.shape:
        raise ExportError(f"export check: {path} returned {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    err = (out - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-12)


# --------------------------------------------------------------------------------- model from a checkpoint


def _state_dict_of(obj) -> Optional[Dict[str, torch.Tensor]]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def load_for_export(model_name: Optional[str], checkpoint: Optional[str], *, num_classes: Optional[int] = None,
                    image_size: Optional[int] = None, in_chans: Optional[int] = None) -> Tuple[nn.Module, Dict[str, object]]:
    """Build the model to export and the metadata to store with it.

    With a fusionblocks training checkpoint (``best.pt`` / ``last.pt``) the model, class names, channels,
    image size and normalization come from it; any option given must agree with it. A plain state_dict
    is loaded strictly into ``model_name``. Without a checkpoint the weights are fresh.
    """
    from .models.registry import create_model, list_models

    if model_name is not None and model_name not in list_models():
        import difflib

        close = difflib.get_close_matches(model_name, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ExportError(f"unknown model {model_name!r}{hint} Available: {', '.join(list_models())}")
    sd = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ExportError(f"checkpoint not found: {path}")
        from .training.checkpoint import foreign_file

        foreign = foreign_file(path)
        if foreign is not None:
            raise ExportError(foreign)
        if path.stat().st_size == 0:
            raise ExportError(f"{path}: empty checkpoint file (0 bytes)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch/zip/pickle raise many types, with many lines, for a file that is not one
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"cannot read checkpoint {path}: {type(e).__name__}: {first[:200]}") from None
        if isinstance(obj, dict) and all(key in obj for key in ("model", "config", "classes")):
            return _from_training_checkpoint(path, obj, model_name, num_classes, image_size, in_chans)
        sd = _state_dict_of(obj)
        if sd is None:
            raise ExportError(f"{path} is neither a fusionblocks training checkpoint (model/config/classes) nor a state_dict")
        if model_name is None:
            raise ExportError(f"{path} is a plain state_dict: name the MODEL it belongs to")
    elif model_name is None:
        raise ExportError("export: name a MODEL or give --checkpoint")
    from .training.recipes import default_recipe, get_recipe

    k, size, ch = num_classes or 1000, image_size or 224, in_chans or 3
    model = create_model(model_name, num_classes=k, **({"in_chans": ch} if ch != 3 else {}))
    if sd is not None:
        _load_strict(model, sd, f"{checkpoint} does not fit {model_name} (num_classes={k}, in_chans={ch})")
    recipe = get_recipe(default_recipe(model_name))  # no training config: what `train` would use for this model
    meta = {"model": model_name, "classes": [f"class_{i}" for i in range(k)], "image_size": size, "in_chans": ch,
            "mean": list(recipe.mean), "std": list(recipe.std), "recipe": recipe.name,
            "weights": str(checkpoint) if sd is not None else "fresh (untrained)"}
    return model, meta


def _load_strict(model: nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    from .training.checkpoint import weights_mismatch

    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{what}: {weights_mismatch(model, sd, e)}") from None


def _from_training_checkpoint(path, ckpt, model_name, num_classes, image_size, in_chans):
    from .models.registry import create_model
    from .training.checkpoint import recorded_epoch, recorded_preprocessing
    from .training.engine import _model_kwargs
    from .training.recipes import get_recipe

    cfg = ckpt["config"]
    classes = list(ckpt["classes"])
    trained = {"model": cfg["model"], "num_classes": len(classes), "image_size": cfg.get("image_size", 224),
               "in_chans": cfg.get("in_chans", 3)}
    asked = {"model": model_name, "num_classes": num_classes, "image_size": image_size, "in_chans": in_chans}
    for key, want in asked.items():
        if want is not None and want != trained[key]:
            raise ExportError(
                f"{path} was trained as {trained['model']} with {trained['num_classes']} classes, "
                f"{trained['in_chans']} channel(s), {trained['image_size']} px; asked for {key} {want!r} "
                f"(omit the option to use the checkpoint's)"
            )
    model = create_model(cfg["model"], num_classes=len(classes), **_model_kwargs(cfg))
    _load_strict(model, ckpt["model"], f"{path}: its weights do not fit {cfg['model']}")
    pre = recorded_preprocessing(ckpt)  # what evaluate and predict --checkpoint use
    meta = {"model": cfg["model"], "classes": classes, "image_size": trained["image_size"],
            "in_chans": trained["in_chans"], "mean": list(pre["mean"]), "std": list(pre["std"]),
            "recipe": get_recipe(cfg.get("recipe") or "hifuse").name, "weights": str(path),
            "epoch": recorded_epoch(ckpt)}
    return model, meta


# ----------------------------------------------------------------------------------------------------- CLI


def run_export(model_name, checkpoint, *, format, out, num_classes=None, image_size=None, in_chans=None) -> ExportResult:
    from .ops.dispatch import ENV_VAR

    backend = os.environ.get(ENV_VAR)
    if format == "onnx" and backend and backend != "reference":  # found by the exporter after tracing, as a traceback
        raise ExportError(f"{ENV_VAR}={backend}: an ONNX file cannot hold fusionblocks' {backend} kernels (no ONNX "
                          f"translation exists); unset {ENV_VAR} (the export then traces the reference, the same "
                          "function in standard operators) or export --format pt2")
    model, meta = load_for_export(model_name, checkpoint, num_classes=num_classes, image_size=image_size,
                                  in_chans=in_chans)
    from . import __version__
    from .ops.dispatch import BackendUnavailable

    meta = meta | {"fusionblocks_version": __version__, "torch_version": torch.__version__, "format": format}
    try:  # the model's own input checks, with its own message, before the exporter wraps them
        with torch.no_grad():
            model.eval()(_example(meta["in_chans"], meta["image_size"], batch=1))
    except ValueError as e:
        raise ExportError(f"{meta['model']} at --image-size {meta['image_size']}: {e}") from None
    except BackendUnavailable as e:  # FUSIONBLOCKS_BACKEND names a backend that cannot run here (e.g. no _C)
        raise ExportError(f"{meta['model']}: {e}") from None
    seconds = export_model(model, out, format=format, image_size=meta["image_size"], in_chans=meta["in_chans"],
                           metadata=meta)
    abs_err, rel_err = check_exported(out, format, model, image_size=meta["image_size"], in_chans=meta["in_chans"])
    return ExportResult(Path(out), format, seconds, abs_err, rel_err, 3)


def _cmd_export(args) -> int:
    from .cli import CLIError, check_out_file

    fmt = args.format
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if fmt is None:
        if suffix not in FORMATS:
            raise CLIError(f"--format not given and --out {args.out!r} ends in neither .onnx nor .pt2")
        fmt = suffix
    elif suffix in FORMATS and suffix != fmt:  # read_metadata and predict tell the formats apart by the suffix
        raise CLIError(f"--format {fmt}, but --out {args.out!r} ends in .{suffix}: name the file .{fmt}")
    check_out_file(args.out, f"the .{fmt} file", f"model.{fmt}")
    try:
        r = run_export(args.model, args.checkpoint, format=fmt, out=args.out, num_classes=args.num_classes,
                       image_size=args.image_size, in_chans=args.in_chans)
    except (ExportError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    runner = "ONNX Runtime (CPU)" if fmt == "onnx" else "torch.export.load"
    size_mb = r.path.stat().st_size / 2**20
    print(f"exported -> {r.path} ({fmt}, {size_mb:.1f} MiB, dynamic batch) in {r.seconds:.1f} s")
    print(f"  check with {runner} on a random batch of {r.batch}: max abs error {r.max_abs_error:.3g}, "
          f"max rel error {r.max_rel_error:.3g} (tolerance {TOLERANCE:g})")
    if not r.ok:
        print(f"fusionblocks export: error: the exported file differs from PyTorch by {r.max_rel_error:.3g} "
              f"(relative), more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def add_cli_commands(sub) -> None:
    from .cli import _positive_int

    p = sub.add_parser(
        "export", help="export a model (a training checkpoint or fresh weights) to ONNX or torch.export (.pt2)",
        description="Export MODEL (or the model of --checkpoint) with a dynamic batch axis, then run the file on a "
                    "random batch (ONNX Runtime for onnx, torch.export.load for pt2) and print its error against "
                    "PyTorch. The preprocessing (class names, image size, channels, mean/std) is stored in the file, "
                    "so `fusionblocks predict --onnx FILE` needs nothing else.",
    )
    p.add_argument("model", nargs="?", default=None, help="model name (default: the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="training checkpoint (best.pt/last.pt) or a plain state_dict")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--image-size", type=_positive_int, default=None, help="default: the checkpoint's, else 224")
    p.add_argument("--in-chans", type=int, default=None, choices=(1, 3), help="default: the checkpoint's, else 3")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the --out suffix")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    p.set_defaults(func=_cmd_export)
