"""``fusionblocks predict``: class probabilities of a checkpoint (or an exported ONNX file) on unlabeled images.

The preprocessing is the one the model was trained with: the recipe's evaluation transform (resize to the
checkpoint's image size, its mean/std) on images decoded with the checkpoint's channel count. An ``.onnx``
file written by ``fusionblocks export`` carries these facts in its metadata, so it needs no checkpoint;
ONNX Runtime runs it on CPU.

Images that cannot be decoded are listed on stderr and in the summary; they do not stop the run.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .data import IMAGE_EXTENSIONS, DataError, hidden_name, load_image
from .transforms import build as build_transform

__all__ = ["Predictor", "PredictResult", "collect_images", "predict_images", "add_cli_commands"]


def collect_images(inputs: Sequence[str | Path]) -> List[Path]:
    """Files named directly, plus every image file under named folders (recursive, sorted, hidden ones left
    out); no duplicates."""
    out: List[Path] = []
    seen = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(hidden_name(part) for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"predict: no images ({', '.join(IMAGE_EXTENSIONS)}) under {p}")
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"predict: input not found: {p}")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass
class Predictor:
    """A model and its preprocessing: ``run(batch (B, C, H, W)) -> probabilities (B, K)``."""

    classes: List[str]
    image_size: int
    in_chans: int
    mean: List[float]
    std: List[float]
    run: Callable[[torch.Tensor], torch.Tensor]
    source: str
    device: str = "cpu"  # where ``run`` computes (ONNX Runtime: the CPU)

    @property
    def transform(self):
        return build_transform(False, {}, self.image_size, self.mean, self.std)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Optional[str] = None) -> "Predictor":
        from .._device import resolve_device
        from .engine import load_checkpoint, model_from_checkpoint

        dev = resolve_device(device)  # a bad --device before a large checkpoint is read
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, Path(path)).to(dev).eval()

        @torch.no_grad()
        def run(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(dev)).float().softmax(-1).cpu()

        return cls(**_preprocessing(ckpt), run=run, source=f"checkpoint {path} ({ckpt['config']['model']})",
                   device=str(dev))

    @classmethod
    def from_onnx(cls, path: str | Path, checkpoint: Optional[str | Path] = None) -> "Predictor":
        """The preprocessing comes from ``checkpoint`` when given, else from the file's metadata."""
        import json

        from ..export import METADATA_KEY

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"predict: ONNX file not found: {path}")
        other = {".pt2": "a torch.export program (--format pt2)", ".pt": "a torch.save file", ".pth": "a torch.save file"}
        if path.suffix.lower() in other:  # ONNX Runtime would only say "Protobuf parsing failed"
            raise DataError(f"predict: --onnx {path} is {other[path.suffix.lower()]}, not an ONNX file; give the "
                            "training checkpoint as --checkpoint, or an .onnx file from `fusionblocks export`")
        try:
            import onnxruntime as ort
        except ImportError:
            raise DataError("predict --onnx needs onnxruntime: `pip install onnxruntime`") from None
        try:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise DataError(f"predict: ONNX Runtime cannot load {path}: {type(e).__name__}: {e}") from None
        name = sess.get_inputs()[0].name
        if checkpoint is not None:
            from .engine import load_checkpoint

            pre = _preprocessing(load_checkpoint(checkpoint))
        else:
            meta = json.loads(sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
            missing = [k for k in _FIELDS if k not in meta]
            if missing:
                raise DataError(
                    f"predict: {path} carries no fusionblocks preprocessing metadata ({', '.join(missing)} missing); "
                    "export it with `fusionblocks export`, or pass --checkpoint for the preprocessing"
                )
            pre = {k: meta[k] for k in _FIELDS}
        want = {1: ("channels", pre["in_chans"]), 2: ("height", pre["image_size"]), 3: ("width", pre["image_size"])}
        shape = sess.get_inputs()[0].shape
        for axis, (what, n) in want.items():
            if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != n:
                source = f"checkpoint {checkpoint}" if checkpoint is not None else "its metadata"
                raise DataError(
                    f"predict: {path} takes input {name} of shape {list(shape)}, but the preprocessing from {source} "
                    f"makes (batch, {pre['in_chans']}, {pre['image_size']}, {pre['image_size']}) ({what} {shape[axis]} "
                    f"vs {n}); give the checkpoint the file was exported from, or none"
                )
        k = sess.get_outputs()[0].shape[-1]
        if isinstance(k, int) and k != len(pre["classes"]):
            raise DataError(f"predict: {path} outputs {k} classes, the preprocessing names {len(pre['classes'])}: "
                            f"{pre['classes']}")

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run(None, {name: x.float().numpy()})[0]).float().softmax(-1)

        return cls(**pre, run=run, source=f"ONNX Runtime on {path}")


_FIELDS = ("classes", "image_size", "in_chans", "mean", "std")


def _preprocessing(ckpt: Dict[str, object]) -> Dict[str, object]:
    """Class names, image size, channels and mean/std of a training checkpoint: the preprocessing it records
    (what ``evaluate`` uses too), or its recipe's for checkpoints written before that was recorded."""
    from .checkpoint import recorded_preprocessing

    pre = recorded_preprocessing(ckpt)
    return {"classes": list(ckpt["classes"]), "image_size": int(pre["image_size"]), "in_chans": int(pre["in_chans"]),
            "mean": list(pre["mean"]), "std": list(pre["std"])}


@dataclass
class PredictResult:
    rows: List[Tuple[str, List[float]]] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], channels: int, transform):
        self.files, self.channels, self.transform = list(files), channels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.files[i], self.channels)), None
        except DataError as e:
            return i, None, str(e)


def _collate(items):
    return items


def predict_images(predictor: Predictor, files: Sequence[Path], *, batch_size: int = 32, num_workers: object = "auto",
                   progress: bool = True, on_failure: Optional[Callable[[str, str], None]] = None) -> PredictResult:
    """Probabilities for every readable file, in order; unreadable ones go to ``failures``.

    ``num_workers``: image-decoding worker processes, or ``"auto"``: as training's
    (:func:`fusionblocks.training.engine.data_workers`): several when the model runs on a GPU, which would
    otherwise wait while each batch is decoded, none on the CPU, whose cores the model uses."""
    from .engine import data_workers

    if batch_size < 1:
        raise ValueError(f"predict: expected batch_size >= 1, got {batch_size}")
    workers = data_workers(num_workers, torch.device(predictor.device), who="predict")
    loader = torch.utils.data.DataLoader(_Images(files, predictor.in_chans, predictor.transform),
                                         batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True, leave=False, disable=not progress)
    result = PredictResult()
    for batch in loader:
        bar.update(len(batch))
        good = [(i, x) for i, x, err in batch if err is None]
        for i, _, err in batch:
            if err is not None:
                result.failures.append((str(files[i]), err))
                if on_failure is not None:
                    on_failure(str(files[i]), err)
        if not good:
            continue
        probs = predictor.run(torch.stack([x for _, x in good]))
        for (i, _), p in zip(good, probs.tolist()):
            result.rows.append((str(files[i]), p))
    bar.close()
    return result


def write_csv(path: str | Path, classes: Sequence[str], rows: Sequence[Tuple[str, List[float]]]) -> None:
    """``path,predicted,<class 1>,...,<class K>``: one row per image, probabilities with 6 decimals."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted", *classes])
        for file, probs in rows:
            best = max(range(len(probs)), key=probs.__getitem__)
            w.writerow([file, classes[best], *(f"{p:.6f}" for p in probs)])


def _run_predict(args) -> int:
    from ..cli import CLIError, check_out_file
    from ..export import ExportError
    from ..ops.dispatch import BackendUnavailable
    from .checkpoint import CheckpointError

    if args.checkpoint is None and args.onnx is None:
        raise CLIError("give --checkpoint (a training checkpoint) or --onnx (a file from `fusionblocks export`)")
    check_out_file(args.out, "the CSV file", "predictions.csv")
    try:
        if args.onnx is not None:
            predictor = Predictor.from_onnx(args.onnx, args.checkpoint)
        else:
            predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
        files = collect_images(args.input)
    except (DataError, ExportError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise CLIError(str(e)) from None

    def warn(file: str, err: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"fusionblocks predict: skipped {err}", file=sys.stderr)  # above the progress bar

    try:
        result = predict_images(predictor, files, batch_size=args.batch_size, num_workers=args.workers,
                                progress=not args.no_progress, on_failure=warn)
    except BackendUnavailable as e:  # FUSIONBLOCKS_BACKEND names a backend that cannot run here (e.g. no _C)
        raise CLIError(f"{predictor.source}: {e}") from None
    try:
        write_csv(args.out, predictor.classes, result.rows)
    except OSError as e:
        raise CLIError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    counts: Dict[str, int] = {}
    for _, probs in result.rows:
        c = predictor.classes[max(range(len(probs)), key=probs.__getitem__)]
        counts[c] = counts.get(c, 0) + 1
    print(f"predicted {len(result.rows)} of {len(files)} images with {predictor.source} -> {args.out}")
    if counts:
        print("  " + ", ".join(f"{c}: {counts[c]}" for c in predictor.classes if c in counts))
    if result.failures:
        print(f"  {len(result.failures)} unreadable, not predicted:")
        for file, _ in result.failures:
            print(f"    {file}")
    return 0 if result.rows else 1


def add_cli_commands(sub) -> None:
    from ..cli import _positive_int
    from .cli import _WORKERS_HELP, _workers

    p = sub.add_parser(
        "predict", help="class probabilities of a checkpoint or an exported ONNX file on image files/folders",
        description="Run a training checkpoint (--checkpoint) or an ONNX file from `fusionblocks export` (--onnx, "
                    "needs only onnxruntime) on images, with the preprocessing the model was trained with, and write "
                    "one CSV row per image: path, predicted class, one probability column per class. Unreadable "
                    "files are listed and skipped.",
    )
    p.add_argument("--checkpoint", default=None, help="training checkpoint (best.pt/last.pt)")
    p.add_argument("--onnx", default=None, help="ONNX file from `fusionblocks export` (run with ONNX Runtime on CPU)")
    p.add_argument("--input", nargs="+", required=True, metavar="DIR|FILE", help="image files and/or folders (recursive)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--workers", type=_workers, default="auto", help=_WORKERS_HELP)
    p.add_argument("--device", default=None, help="for --checkpoint: default cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)
