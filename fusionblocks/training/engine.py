"""Train and evaluate fusionblocks models the way the papers do.

:func:`train` writes into its output folder:

* ``metrics.json`` — the resolved config, classes, one entry per epoch (train loss/accuracy, validation loss and
  the full metric set, lr, seconds), the best epoch, checkpoint sizes, and the test-set metrics of ``best.pt``;
* ``best.pt`` (what inference needs) and ``last.pt`` (what ``--resume`` needs), see
  :mod:`fusionblocks.training.checkpoint`;
* the plots ``curves.png``, ``confusion_matrix.png``/``roc.png`` (validation split, best epoch),
  ``test_confusion_matrix.png``/``test_roc.png``, and TensorBoard scalars in ``tensorboard/`` when
  ``tensorboard`` is importable.

Crash consistency: at the end of each epoch ``best.pt`` is written first (when the epoch improved), then
``last.pt`` — the commit point, which carries the whole history and the best epoch's validation predictions —
then everything derived from it (``metrics.json``, plots, TensorBoard). Each write is atomic. A kill anywhere
leaves a ``last.pt`` from which ``resume=True`` rebuilds the derived files and continues to the same final result
as an uninterrupted run (data order and augmentation are seeded per epoch; RNG states are restored).
``resume`` refuses a configuration that differs from the saved one in anything that changes the result.

:func:`evaluate` loads a checkpoint and writes the same metrics and plots for a data folder, plus
Grad-CAM heatmaps of the last fusion stage, spread over the classes, when asked.

Multi-GPU: launch with ``torchrun --nproc-per-node N -m fusionblocks train ...`` (DDP; rank 0 writes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .._device import resolve_device
from ..models.registry import create_model, default_cfg
from . import data as D
from . import plots
from .checkpoint import (CHECKPOINT_VERSION, CheckpointError, _model_kwargs, crash_point, file_size_str,
                         load_checkpoint, load_inference, model_from_checkpoint, preprocessing_of,
                         recorded_epoch, remove_stale_temporaries, save_checkpoint)
from .warmstart import apply_init, describe_record, read_init
from .recipes import (Recipe, augment_spec, build_optimizer, build_scheduler, default_recipe, describe_augment,
                      get_recipe, load_optimizer_state, resolve_class_weights)
from .transforms import build as build_transform

__all__ = ["TrainConfig", "train", "evaluate", "gradcam", "load_checkpoint", "load_inference", "model_from_checkpoint",
           "save_checkpoint", "CheckpointError", "CHECKPOINT_VERSION"]


@dataclass
class TrainConfig:
    """Everything that defines a run; saved (resolved) in every checkpoint and in ``metrics.json``."""

    model: str
    data: str
    out: str
    recipe: Optional[str] = None  # None: the model's default (hatr for HATR models, else hifuse)
    epochs: Optional[int] = None  # None: the recipe's
    batch_size: Optional[int] = None  # None: the recipe's
    image_size: int = 224
    lr: Optional[float] = None
    in_chans: int = 3
    class_weights: Optional[object] = "recipe"  # "recipe" | "none" | "balanced" | list of floats
    augment: str = "recipe"  # recipe | light | none
    seed: int = 0
    num_workers: object = "auto"  # an int, or "auto": worker processes on CUDA, none on CPU (data_workers)
    amp: str = "auto"  # auto | bf16 | fp16 | none
    compile: bool = False
    grad_checkpointing: bool = False
    resume: object = False  # False | True (OUT/last.pt must exist) | "auto" (resume if there is a run, else start)
    overwrite: bool = False  # replace a run already in OUT
    device: Optional[str] = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    synthetic_samples: int = 64
    synthetic_classes: int = 2
    max_steps_per_epoch: Optional[int] = None
    class_names: Optional[List[str]] = None  # for a .npz without medmnist installed
    progress: bool = True
    tensorboard: bool = True  # scalars in OUT/tensorboard when tensorboard is importable
    plots: bool = True  # curves, confusion matrices and ROC curves as PNG
    log: bool = True  # print the setup and one line per epoch
    model_kwargs: Dict[str, object] = field(default_factory=dict)
    init: Optional[str] = None  # weights to start from (fine-tuning; see fusionblocks.training.warmstart)


# fields of the resolved config that change the result of a run, with the option that sets each
RESULT_FIELDS = {
    "model": "--model", "model_kwargs": "model_kwargs", "data": "--data", "recipe": "--recipe", "augment": "--augment",
    "epochs": "--epochs", "batch_size": "--batch-size", "image_size": "--image-size", "lr": "--lr",
    "in_chans": "--in-chans", "class_weights": "--class-weights", "seed": "--seed", "val_fraction": "--val-fraction",
    "test_fraction": "--test-fraction", "synthetic_samples": "--synthetic-samples",
    "synthetic_classes": "--synthetic-classes", "max_steps_per_epoch": "--max-steps", "amp": "--amp",
    "world_size": "world size (torchrun --nproc-per-node)", "data_files": "the images in --data", "init": "--init",
}
# invocation controls, not part of a run's identity
_NOT_SAVED = ("resume", "overwrite", "progress", "log", "plots", "tensorboard")
# files a run writes into its folder (what --overwrite removes)
RUN_FILES = ("metrics.json", "best.pt", "last.pt", "curves.png", "confusion_matrix.png", "roc.png",
             "test_confusion_matrix.png", "test_roc.png")
RUN_DIRS = ("tensorboard",)


# ----------------------------------------------------------------------------------------------- setup


class RefusedOnRank0(ValueError):
    """Raised under torchrun on the ranks other than 0 when rank 0 refuses the run (its folder, or unreadable
    images any process found), with the same message; the CLI leaves printing it to rank 0."""


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _datasets(cfg: TrainConfig, recipe: Recipe, aug: Dict[str, object]):
    """-> classes, train/val/test datasets, train class counts, the image files per split (None: nothing
    on disk to check), and the files of the class folders left out as not images."""
    mean, std = recipe.mean, recipe.std
    train_tf = build_transform(True, aug, cfg.image_size, mean, std)
    eval_tf = build_transform(False, aug, cfg.image_size, mean, std)
    if cfg.data == "synthetic":
        n, k = cfg.synthetic_samples, cfg.synthetic_classes
        size = max(cfg.image_size, 32)
        mk = lambda num, seed, tf: D.SyntheticDataset(num, k, size, cfg.in_chans, tf, seed)  # noqa: E731
        train = mk(n, cfg.seed, train_tf)
        val = mk(max(n // 4, k), cfg.seed + 1, eval_tf)
        test = mk(max(n // 4, k), cfg.seed + 2, eval_tf)
        counts = [len(range(c, n, k)) for c in range(k)]
        return train.classes, train, val, test, counts, None, []
    splits = D.load_splits(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                           class_names=cfg.class_names)
    if not splits.val:
        raise D.DataError(f"{cfg.data}: the validation split is empty (add images or a val/ folder)")
    mk = lambda s, tf: D.ImageFolderDataset(s, splits.classes, tf, cfg.in_chans, cfg.seed)  # noqa: E731
    counts = D.class_counts(splits.train, len(splits.classes))
    test = mk(splits.test, eval_tf) if splits.test else None
    files = {"train": splits.train, "val": splits.val, "test": splits.test}
    return splits.classes, mk(splits.train, train_tf), mk(splits.val, eval_tf), test, counts, files, splits.skipped


class _EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch); shards for DDP. Resume-exact."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per = math.ceil(self.n / self.world)
        order = (order + order[: per * self.world - self.n])[self.rank :: self.world]
        return iter(order)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)


class _Batches(torch.utils.data.Sampler):
    """Batches of a sampler's indices; a final batch of one sample is dropped (BatchNorm in training cannot
    normalise one value per channel, e.g. HEMF's 1x1 maps at small sizes). A different sample is left out each
    epoch, since the order is reshuffled."""

    def __init__(self, sampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size
        n = len(sampler)
        self.drops_one = batch_size > 1 and n % batch_size == 1

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not (len(batch) == 1 and self.batch_size > 1):
            yield batch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size + (0 if self.drops_one or len(self.sampler) % self.batch_size == 0 else 1)


class _WithEpoch(torch.utils.data.Sampler):
    """``(epoch, index)`` keys of an :class:`_EpochSampler`: the epoch travels with each index, so that worker
    processes (persistent ones keep the dataset copy of the epoch they started in) augment with the right epoch."""

    def __init__(self, sampler: _EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _AtEpoch(Dataset):
    """``dataset[(epoch, i)]``: ``set_epoch(epoch)`` (in whichever process loads it), then ``dataset[i]``."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        return self.ds[i]


MAX_AUTO_WORKERS = 8


def data_workers(requested, device: torch.device, world: int = 1, who: str = "train") -> int:
    """Data-loading worker processes for ``requested`` (an int >= 0, or ``"auto"``).

    ``"auto"``: none on a CPU device, where the model's own threads use every core and workers would take cores
    from it; on a GPU, the CPU cores this process may use, shared among the ``world`` processes of the machine,
    one kept for the process itself, at most :data:`MAX_AUTO_WORKERS`. Decoding and augmenting a batch of images in
    the training process (0 workers) would otherwise add to every step's time while the GPU waits. The workers
    change no result: every sample draws its augmentation from its own seed (:class:`_AtEpoch`). ``who`` names the
    command in the error for a bad ``requested``.
    """
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise ValueError(f"{who}: expected num_workers as an int >= 0 or 'auto', got {requested!r}")
        return requested
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cores // _local_processes(world) - 1))


def _local_processes(world: int) -> int:
    """The training processes of this machine (torchrun's ``LOCAL_WORLD_SIZE``), not of every node: what shares
    its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))) if world > 1 else 1


def _loader(ds: Dataset, batch_size: int, num_workers: int, sampler=None, pin_memory: bool = False) -> DataLoader:
    """Evaluation (``sampler=None``: every sample, in order) or training loader (``sampler``: see :class:`_Batches`).
    ``pin_memory`` for a CUDA device: the batches' copies to it (``non_blocking``) then overlap the step."""
    # a loader of its own for the workers' base seed: drawn from the global RNG, it would shift the model's
    # random stream (dropout) by one draw per new iterator, and persistent workers make one iterator per run, not
    # per epoch, so a resumed run would draw differently from an uninterrupted one (the datasets seed themselves)
    gen = torch.Generator().manual_seed(0)
    if sampler is None:
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          persistent_workers=num_workers > 0, generator=gen, pin_memory=pin_memory)
    return DataLoader(_AtEpoch(ds), batch_sampler=_Batches(_WithEpoch(sampler), batch_size), num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=gen, pin_memory=pin_memory)


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, leave=False, dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: Optional[torch.dtype],
            weight: Optional[torch.Tensor] = None, progress: bool = False):
    """(mean loss, labels (N,), probabilities (N, K)) over every sample of ``loader``.

    The loss is the training loss over the whole split: with class ``weight``, torch's weighted mean
    ``sum(w_y * loss) / sum(w_y)`` (what ``F.cross_entropy(..., weight=weight)`` gives on one batch), else the
    plain mean."""
    model.eval()
    losses, norms, labels, probs = [], [], [], []
    for x, y in _progress(loader, progress, desc="eval"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        logits = logits.float()
        losses.append(F.cross_entropy(logits, y, weight=weight, reduction="sum").item())
        norms.append(len(y) if weight is None else weight.to(logits.device)[y].sum().item())
        labels.append(y.cpu())
        probs.append(logits.softmax(-1).cpu())
    total = sum(norms)
    return sum(losses) / total if total > 0 else 0.0, torch.cat(labels).numpy(), torch.cat(probs).numpy()


def _write_eval_artifacts(out: Path, prefix: str, labels, probs, classes, metrics, what: str) -> None:
    """Confusion matrix and ROC, titled with ``what`` (split, checkpoint and epoch)."""
    plots.plot_confusion(metrics["confusion_matrix"], classes, out / f"{prefix}confusion_matrix.png",
                         title=f"Confusion matrix: {what}")
    plots.plot_roc(labels, probs, classes, out / f"{prefix}roc.png", title=f"ROC (one-vs-rest): {what}")


# ------------------------------------------------------------------------------------------- run folder


def _resolved_config(cfg: TrainConfig, recipe: Recipe, epochs: int, batch_size: int, world: int) -> Dict[str, object]:
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SAVED}
    d.update(recipe=recipe.name, epochs=epochs, batch_size=batch_size, lr=cfg.lr if cfg.lr is not None else recipe.lr,
             world_size=world)
    if cfg.data != "synthetic":
        d["data"] = str(Path(cfg.data).expanduser().resolve())
    return d


def _comparable(cfg: Dict[str, object]) -> Dict[str, object]:
    out = {}
    for k in RESULT_FIELDS:
        v = cfg.get(k)
        if k == "class_weights":  # what the loss used, and how it was asked for
            v = (cfg.get("class_weights"), cfg.get("class_weights_resolved"))
        if k == "world_size" and v is None:
            v = 1
        if k in ("synthetic_samples", "synthetic_classes") and cfg.get("data") != "synthetic":
            v = None
        if k == "augment" and v is None:
            v = "recipe"
        if k == "init":
            v = describe_record(v)
        if k == "data_files" and isinstance(v, dict):
            v = ", ".join(f"{v[s]} {s}" for s in D.SPLITS if s in v) + f" (fingerprint {v.get('sha1', '?')})"
        out[k] = v
    return out


def config_differences(saved: Dict[str, object], now: Dict[str, object]) -> List[str]:
    """One line per result-changing setting that differs: ``--image-size: 32 in the saved run, 64 now``."""
    a, b = _comparable(saved), _comparable(now)
    lines = []
    for k, flag in RESULT_FIELDS.items():
        if k == "data_files" and (a[k] is None or b[k] is None):  # runs saved before it was recorded
            continue
        if a[k] != b[k]:
            if k == "class_weights":
                lines.append(f"{flag}: {a[k][0]} (weights {a[k][1]}) in the saved run, {b[k][0]} (weights {b[k][1]}) now")
            else:
                lines.append(f"{flag}: {a[k]!r} in the saved run, {b[k]!r} now")
    return lines


def _existing_run(out: Path) -> bool:
    return any((out / f).exists() for f in ("metrics.json", "last.pt", "best.pt"))


def _saved_config(out: Path) -> Optional[Dict[str, object]]:
    try:
        return json.loads((out / "metrics.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        pass
    for name in ("last.pt", "best.pt"):
        try:
            return load_checkpoint(out / name)["config"]
        except (OSError, ValueError, KeyError):
            pass
    return None


def _clear_run(out: Path) -> None:
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        if (out / d).is_dir():
            shutil.rmtree(out / d)
    if (out / "gradcam").is_dir():
        shutil.rmtree(out / "gradcam")


def _prepare_out(cfg: TrainConfig, out: Path, now: Dict[str, object]) -> bool:
    """Decide between a fresh start and a resume; returns True to resume. Refuses to mix runs."""
    has_last = (out / "last.pt").is_file()
    if cfg.resume:
        if has_last:
            return True
        if _existing_run(out):  # killed before its first epoch was committed: that run restarts from epoch 1
            saved = _saved_config(out)
            diffs = config_differences(saved, now) if saved is not None else ["(its configuration cannot be read)"]
            if diffs:
                raise ValueError(f"train --resume: {out} holds no last.pt, and a run of another configuration:\n  "
                                 + "\n  ".join(diffs) + "\npass --overwrite to replace it, or choose another --out")
            _clear_run(out)
            return False
        if cfg.resume != "auto":
            what = "does not exist" if not out.exists() else "holds no run (no last.pt)"
            raise ValueError(
                f"train --resume: nothing to resume: {out} {what}. Run without --resume to start fresh, "
                "or pass --resume auto to resume when there is a run and start fresh otherwise"
            )
        return False
    if _existing_run(out):
        if cfg.overwrite:
            _clear_run(out)
            return False
        saved = _saved_config(out)
        diffs = config_differences(saved, now) if saved is not None else ["(its configuration cannot be read)"]
        if diffs:
            raise ValueError(f"train: {out} already holds a run of another configuration:\n  " + "\n  ".join(diffs)
                             + "\npass --overwrite to replace it, or choose another --out")
        raise ValueError(f"train: {out} already holds a run of this configuration: pass --resume to continue it, "
                         f"or --overwrite to start it again")
    return False


class _TensorBoard:
    """Scalars per epoch in ``OUT/tensorboard`` when ``tensorboard`` is importable; otherwise nothing."""

    def __init__(self, folder: Path, enabled: bool, start_epoch: int):
        self.writer, self.note = None, "off"
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # not installed, or a broken install: training goes on without it
            self.note = f"not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            return
        # on resume, the last committed epoch is purged and logged again: a kill may have come before its scalars
        self.writer = SummaryWriter(str(folder), purge_step=start_epoch or None)
        self.note = f"scalars in {folder}"

    def log(self, entry: Dict[str, object]) -> None:
        if self.writer is None:
            return
        e, v = entry["epoch"], entry["val"]
        for tag, value in (("train/loss", entry["train_loss"]), ("train/accuracy", entry["train_accuracy"]),
                           ("val/loss", entry["val_loss"]), ("val/accuracy", v["accuracy"]),
                           ("val/f1_macro", v["f1_macro"]), ("val/auc", v["auc"]), ("lr", entry["lr"])):
            if value is not None:
                self.writer.add_scalar(tag, value, e)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _epoch_line(entry: Dict[str, object], epochs: int, eta: Optional[float], best: bool) -> str:
    v = entry["val"]
    auc = "n/a" if v["auc"] is None else f"{v['auc']:.3f}"
    eta_s = "" if eta is None else f"  ETA {_fmt_seconds(eta)}"
    return (f"epoch {entry['epoch']}/{epochs}  train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.3f}"
            f"  val loss {entry['val_loss']:.4f} acc {v['accuracy']:.3f} F1 {v['f1_macro']:.3f} AUC {auc}"
            f"  lr {entry['lr']:.2e}  {entry['seconds']:.1f}s{eta_s}" + ("  * best" if best else ""))


def _rng_state() -> Dict[str, object]:
    state: Dict[str, object] = {"torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}
    py = random.getstate()
    state["python"] = {"version": py[0], "state": list(py[1]), "gauss": py[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):  # version-1 checkpoints saved the torch state alone
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sizes(out: Path) -> Dict[str, int]:
    return {f: (out / f).stat().st_size for f in ("best.pt", "last.pt") if (out / f).is_file()}


# ------------------------------------------------------------------------------------------------ train


def _data_files(root: str, files: Optional[Dict[str, Sequence[Tuple[Path, int]]]]) -> Optional[Dict[str, object]]:
    """The images of each split and a fingerprint of them all (their paths under ``root`` and labels), saved with
    a run's config: a resumed run on images added, removed or relabelled since would go on unsaid."""
    if files is None:
        return None
    digest = hashlib.sha1()
    for split in D.SPLITS:
        for i, (path, label) in enumerate(files.get(split, ())):
            # a file by its path under root; an image held in memory (a MedMNIST .npz entry) by its position
            name = os.path.relpath(path, root) if isinstance(path, (str, os.PathLike)) else i
            digest.update(f"{split}\0{name}\0{label}\n".encode())
    return {**{s: len(files.get(s, ())) for s in D.SPLITS}, "sha1": digest.hexdigest()[:12]}


def _check_image_size(model: str, size: int) -> None:
    """``--image-size`` against the smallest input the model takes (its ``pretrained_cfg``'s ``min_input_size``:
    HATR's), before the data is read: the first forward would fail only after every image was checked."""
    try:
        lo = default_cfg(model).get("min_input_size")
    except (ValueError, AttributeError):  # an unknown model (create_model says so) or one without default_cfgs
        return
    if lo is not None and size < max(lo[1], lo[2]):
        raise ValueError(f"train: --image-size {size} is below the smallest input {model} takes, {lo[1]}x{lo[2]}")


def train(cfg: TrainConfig) -> Dict[str, object]:
    """Run a training job; returns the content of ``metrics.json``."""
    from .metrics import classification_metrics

    recipe_name = cfg.recipe or default_recipe(cfg.model)
    recipe = get_recipe(recipe_name)
    aug = augment_spec(recipe, cfg.augment)
    epochs = cfg.epochs if cfg.epochs is not None else recipe.epochs
    batch_size = cfg.batch_size if cfg.batch_size is not None else recipe.batch_size
    for what, v in (("epochs", epochs), ("batch_size", batch_size), ("image_size", cfg.image_size),
                    ("max_steps_per_epoch", cfg.max_steps_per_epoch)):
        if v is not None and v < 1:
            raise ValueError(f"train: expected {what} >= 1, got {v}")
    _check_image_size(cfg.model, cfg.image_size)
    rank, local_rank, world = _distributed()
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and device.type == "cuda":  # the device nccl's object collectives and barrier use
        torch.cuda.set_device(device)
    amp = _amp_dtype(cfg.amp, device)
    out = Path(cfg.out)
    say = (lambda *a: print(*a, flush=True)) if (cfg.log and rank == 0) else (lambda *a: None)

    classes, train_ds, val_ds, test_ds, counts, files, skipped = _datasets(cfg, recipe, aug)
    spec = recipe.class_weights if cfg.class_weights == "recipe" else cfg.class_weights
    weights, weights_source = resolve_class_weights(spec, classes, counts, recipe.name if cfg.class_weights == "recipe" else None)
    cfg_dict = _resolved_config(cfg, recipe, epochs, batch_size, world)
    cfg_dict.update(class_weights_resolved=weights, class_weights_source=weights_source, augment_resolved=aug,
                    data_files=_data_files(cfg.data, files))
    init = read_init(cfg.init, cfg_dict) if cfg.init is not None else None  # refused here, before any image is decoded
    cfg_dict["init"] = init[0] if init is not None else None

    def load_resumed() -> Dict[str, object]:
        last = load_checkpoint(out / "last.pt", require=("model", "config", "classes", "optimizer", "scheduler", "epoch"))
        diffs = config_differences(last["config"], cfg_dict)
        if list(last["classes"]) != list(classes):
            diffs.append(f"classes: {list(last['classes'])} in the saved run, {list(classes)} in --data now")
        if diffs:
            raise ValueError(f"train --resume: {out / 'last.pt'} was trained with other settings; refusing to resume "
                             "with:\n  " + "\n  ".join(diffs)
                             + "\nresume with the saved settings, or start a new run (another --out, or --overwrite)")
        return last

    resume, refused, ckpt = False, None, None
    if rank == 0:
        try:
            resume = _prepare_out(cfg, out, cfg_dict)
            ckpt = load_resumed() if resume else None
        except ValueError as e:
            refused = e
    if world > 1:  # rank 0's decision for every process: a refusal left the others waiting in DDP's first collective
        decision = [resume, None if refused is None else str(refused)]
        dist.broadcast_object_list(decision, src=0, device=device if device.type == "cuda" else None)
        resume = decision[0]
        if rank != 0 and decision[1] is not None:
            raise RefusedOnRank0(decision[1])
    if refused is not None:
        raise refused
    if resume and ckpt is None:  # a rank other than 0: the checkpoint rank 0 checked
        ckpt = load_checkpoint(out / "last.pt")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for p in remove_stale_temporaries(out):
            say(f"removed {p.name}, a temporary file left by a process that no longer runs")

    say(f"model {cfg.model}, recipe {recipe.name}" + ("" if cfg.recipe else " (the model's default)")
        + f", {epochs} epoch{'s' if epochs != 1 else ''}, batch {batch_size}, lr {cfg_dict['lr']:g}, image size {cfg.image_size}, "
        f"{cfg.in_chans} channel{'s' if cfg.in_chans > 1 else ''}, device {device}")
    say(f"augmentation ({cfg.augment}): {describe_augment(aug)}")
    say(f"class weights: {weights_source}" + (f": {[round(w, 4) for w in weights]}" if weights else ""))
    say(f"data: {len(classes)} classes {classes}; {len(train_ds)} train, {len(val_ds)} val, "
        f"{len(test_ds) if test_ds is not None else 0} test images")
    for split, samples in (files or {}).items():
        missing = [c for c, n in zip(classes, D.class_counts(samples, len(classes))) if n == 0]
        if samples and missing:
            say(f"note: no {split} images of class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                f"(too few images to split?): the {split} metrics' macro averages count "
                f"{'them' if len(missing) > 1 else 'it'} as 0 and the AUC is undefined")
    if skipped:
        kinds = sorted({p.suffix.lower() or p.name for p in skipped})
        say(f"left out {len(skipped)} file{'s' if len(skipped) > 1 else ''} of the class folders that "
            f"{'are' if len(skipped) > 1 else 'is'} not {'/'.join(e[1:] for e in D.IMAGE_EXTENSIONS)} "
            f"({', '.join(kinds)}): " + ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes=len(classes), **_model_kwargs(cfg_dict))
    if init is not None and not resume:  # a resumed run's weights come from last.pt
        say(apply_init(model, *init, cfg_dict, classes))
    init = None  # the file's tensors are no longer needed
    model = model.to(device)
    if files is not None:  # under torchrun each process decodes its share; every process learns of every problem
        total, bad = D.image_problems(files, part=(rank, world), progress=cfg.progress and rank == 0,
                                      workers=max(1, min(8, (os.cpu_count() or 1) // _local_processes(world))))
        if world > 1:
            shares: List[object] = [None] * world
            dist.all_gather_object(shares, bad)
            bad = [b for share in shares for b in share]
        if bad:
            err = D.unreadable_images(total, bad)
            raise err if rank == 0 else RefusedOnRank0(str(err))
        say(f"checked {total} images: all readable" + (f" ({world} processes, a share each)" if world > 1 else ""))

    if rank > 0:  # a random stream of its own (dropout, drop path) from the seed and the rank; DDP takes rank 0's weights
        seed_everything(cfg.seed + 1_000_003 * rank)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"train: model {cfg.model!r} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    weight_t = torch.tensor(weights, device=device) if weights is not None else None

    sampler = _EpochSampler(len(train_ds), cfg.seed, rank, world)
    workers, pin = data_workers(cfg.num_workers, device, world), device.type == "cuda"
    train_loader = _loader(train_ds, batch_size, workers, sampler, pin)
    if len(train_loader) == 0:
        raise D.DataError(f"train: {len(sampler)} training sample(s) per process cannot make a batch of 2 or more")
    if world > 1 and len(train_ds) % world:
        pad = len(sampler) * world - len(train_ds)
        say(f"{len(train_ds)} training samples over {world} processes: {pad} of them {'is' if pad == 1 else 'are'} "
            f"taken twice each epoch (a different {'one' if pad == 1 else 'few'} each time), so that every process "
            f"has {len(sampler)}")
    if train_loader.batch_sampler.drops_one:
        which = (f"each process's last training batch would hold 1 sample: it is left out each epoch ({world} samples "
                 "in all, different ones" if world > 1 else
                 "the last training batch would hold 1 sample: it is left out each epoch (a different one")
        say(f"{which} each time; BatchNorm needs 2 or more); evaluation sees every sample")
    val_loader = _loader(val_ds, batch_size, workers, pin_memory=pin)
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    optimizer = build_optimizer(model, recipe, cfg.lr)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, epochs, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    preprocessing = preprocessing_of(cfg_dict, recipe.mean, recipe.std)

    done, best, best_epoch, history, best_preds = 0, -1.0, 0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        done = recorded_epoch(ckpt)
        best, history = float(ckpt["best_metric"]), list(ckpt["history"])
        best_epoch = int(ckpt.get("best_epoch", 0))
        best_preds = ckpt.get("best_val_predictions")
        _set_rng_state(ckpt["rng_ranks"][rank] if "rng_ranks" in ckpt else ckpt["rng"])
        if rank == 0 and int(ckpt.get("version", 1)) >= 2:  # a version-1 best.pt counts its epoch from 0
            _check_best(out, best_epoch, done, ckpt)
        say(f"resuming {out} after epoch {done} of {epochs} (best val accuracy {best:.4f} at epoch {best_epoch})")
        ckpt = None  # free the optimizer state copy

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    tb = _TensorBoard(out / "tensorboard", cfg.tensorboard and rank == 0, done)
    if rank == 0 and cfg.tensorboard:
        say(f"TensorBoard: {tb.note}")
    if rank == 0 and history:  # rebuild what a kill after last.pt may have left out of date
        _write_run_outputs(out, cfg_dict, classes, history, best, best_epoch, best_preds, cfg.plots)
        tb.log(history[-1])
    durations: List[float] = []
    try:
        for epoch in range(done, epochs):
            t0 = time.time()
            sampler.set_epoch(epoch)  # the loader hands the epoch to the dataset with each index (_AtEpoch)
            train_model.train()
            loss_sum, norm, correct, seen = 0.0, 0.0, 0, 0
            it = _progress(train_loader, cfg.progress and rank == 0, desc=f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch)
            for step, (x, y) in enumerate(it):
                if step >= steps_per_epoch:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight_t)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"train: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
                # the epoch's loss as predict gives the validation loss: with class weights sum(w_y * loss) / sum(w_y)
                # over the epoch (the mean of the batches' weighted means is biased: their sums of weights differ)
                w = len(y) if weight_t is None else weight_t[y].sum().item()
                loss_sum += loss.item() * w
                norm += w
                correct += (logits.argmax(-1) == y).sum().item()
                seen += len(y)
            if hasattr(it, "close"):
                it.close()
            if world > 1:  # the train loss/accuracy over every process's samples, not rank 0's shard alone
                sums = torch.tensor([loss_sum, norm, correct, seen], dtype=torch.float64, device=device)  # nccl: on the GPU
                dist.all_reduce(sums)
                loss_sum, norm, correct, seen = sums[0].item(), sums[1].item(), int(sums[2].item()), int(sums[3].item())
            rng = _rng_state()
            if world > 1:  # every rank's RNG states, for --resume
                rng_ranks: List[object] = [None] * world
                dist.all_gather_object(rng_ranks, rng)
            if rank != 0:
                continue
            val_loss, labels, probs = predict(model, val_loader, device, amp, weight_t)
            val_metrics = classification_metrics(labels, probs, classes)
            entry = {
                "epoch": epoch + 1, "train_loss": loss_sum / norm if norm > 0 else 0.0,
                "train_accuracy": correct / max(seen, 1), "train_samples": seen,
                "val_loss": val_loss, "val": val_metrics, "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.time() - t0,
            }
            history.append(entry)
            improved = val_metrics["accuracy"] > best
            if improved:
                best, best_epoch = val_metrics["accuracy"], epoch + 1
                best_preds = {"labels": torch.from_numpy(labels.copy()), "probs": torch.from_numpy(probs.copy())}
            inference = {
                "kind": "inference", "version": CHECKPOINT_VERSION, "model": model.state_dict(), "config": cfg_dict,
                "classes": list(classes), "preprocessing": preprocessing, "epoch": epoch + 1, "val": val_metrics,
            }
            crash_point("before_best", epoch + 1)
            if improved:
                save_checkpoint(out / "best.pt", inference, epoch + 1)
            crash_point("after_best", epoch + 1)
            save_checkpoint(out / "last.pt", inference | {
                "kind": "resume", "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "best_metric": best, "best_epoch": best_epoch, "history": history,
                "best_val_predictions": best_preds, "rng": rng, **({"rng_ranks": rng_ranks} if world > 1 else {}),
            }, epoch + 1)
            crash_point("after_last", epoch + 1)
            _write_run_outputs(out, cfg_dict, classes, history, best, best_epoch, best_preds, cfg.plots, improved)
            crash_point("after_outputs", epoch + 1)
            tb.log(entry)
            durations.append(entry["seconds"])
            remaining = epochs - epoch - 1
            eta = sum(durations) / len(durations) * remaining if remaining else None
            say(_epoch_line(entry, epochs, eta, improved))
    finally:
        tb.close()

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {}
    result = _result(cfg_dict, classes, history, best, best_epoch, out)
    if test_ds is not None and len(test_ds):
        best_ckpt = load_inference(out / "best.pt")
        test_loss, labels, probs = predict(best_ckpt.model.to(device), _loader(test_ds, batch_size, workers, pin_memory=pin),
                                           device, amp, weight_t)
        result["test"] = classification_metrics(labels, probs, classes) | {
            "loss": test_loss, "checkpoint": "best.pt", "epoch": best_ckpt.epoch}
        if cfg.plots:
            _write_eval_artifacts(out, "test_", labels, probs, classes, result["test"],
                                  f"test split, best.pt (epoch {best_ckpt.epoch})")
        crash_point("before_final_metrics")
        _write_json(out / "metrics.json", result)
    sizes = result["checkpoints"]
    say("checkpoints: " + ", ".join(f"{k} {file_size_str(v['bytes'])}" for k, v in sizes.items())
        + " (best.pt: weights, config, classes, preprocessing; last.pt: also optimizer, scheduler, RNG for --resume)")
    return result


def _check_best(out: Path, best_epoch: int, done: int, last: Dict[str, object]) -> None:
    """On resume: best.pt must hold the best epoch recorded in last.pt (or a later, not yet committed one,
    which the resumed run recomputes)."""
    path = out / "best.pt"
    if best_epoch <= 0:
        return
    try:
        epoch = int(load_checkpoint(path).get("epoch", -1))
    except (FileNotFoundError, CheckpointError):
        epoch = -1
    if epoch == best_epoch or epoch > done:
        return
    if best_epoch == done:  # the best epoch is the last one: last.pt holds its weights
        keep = ("kind", "version", "model", "config", "classes", "preprocessing", "epoch", "val")
        save_checkpoint(path, {k: last[k] for k in keep if k in last} | {"kind": "inference"})
        return
    raise CheckpointError(f"{path} does not hold epoch {best_epoch}, the best epoch recorded in {out / 'last.pt'}; "
                          f"start the run fresh with --overwrite")


def _write_json(path: Path, obj) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def _result(cfg_dict, classes, history, best, best_epoch, out: Path) -> Dict[str, object]:
    return {"config": cfg_dict, "classes": list(classes), "epochs": history, "best_val_accuracy": best,
            "best_epoch": best_epoch,
            "checkpoints": {k: {"bytes": v, "epoch": best_epoch if k == "best.pt" else len(history)}
                            for k, v in _sizes(out).items()}}


def _write_run_outputs(out: Path, cfg_dict, classes, history, best, best_epoch, best_preds, with_plots=True,
                       plots_of_best=True) -> None:
    """Everything derived from last.pt: metrics.json, curves, the best epoch's validation confusion matrix/ROC."""
    _write_json(out / "metrics.json", _result(cfg_dict, classes, history, best, best_epoch, out))
    if not with_plots:
        return
    plots.plot_curves(history, out / "curves.png")
    if plots_of_best and best_preds is not None:
        entry = history[best_epoch - 1]
        _write_eval_artifacts(out, "", best_preds["labels"].numpy(), best_preds["probs"].numpy(), classes,
                              entry["val"], f"val split, best.pt (epoch {best_epoch})")


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(checkpoint: str | Path, data: str, out: str | Path, *, split: str = "auto", batch_size: int = 32,
             gradcam: int = 0, device: Optional[str] = None, num_workers: object = "auto",
             progress: bool = True) -> Dict[str, object]:
    """Metrics, confusion matrix and ROC of a checkpoint on a data folder (``split``: test, val, train, all or auto)."""
    from .metrics import classification_metrics

    ck = load_inference(checkpoint)
    cfg, classes, pre = ck.config, ck.classes, ck.preprocessing
    dev = resolve_device(device)
    model = ck.model.to(dev).eval()
    tf = ck.transform()
    if data == "synthetic":
        if split not in ("auto", "test"):
            raise D.DataError(f"evaluate: synthetic data has a test split only, got --split {split}")
        split = "test"
        ds = D.SyntheticDataset(max(cfg.get("synthetic_samples", 64) // 4, len(classes)), len(classes),
                                max(pre["image_size"], 32), pre["in_chans"], tf, cfg.get("seed", 0) + 2)
        what = "synthetic test set"
    elif str(data).lower().endswith(".npz"):
        from .medmnist import eval_samples

        split = "test" if split == "auto" else split
        ds = D.ImageFolderDataset(eval_samples(data, split, classes), classes, tf, pre["in_chans"])
        what = f"{split} split of {Path(data).name}" if split != "all" else f"all of {Path(data).name}"
    else:
        root = Path(data)
        if not root.is_dir():
            raise D.DataError(f"evaluate: data folder not found: {root}")
        present = [s for s in D.SPLITS if (root / s).is_dir()]
        D.check_split_names(root, present)
        kw = {k: cfg.get(k, getattr(TrainConfig, k)) for k in ("val_fraction", "test_fraction", "seed")}
        if present:
            if split == "auto":
                split = "test" if "test" in present else ("val" if "val" in present else "all")
            # without val/, train took its validation images from train/ with the run's seed and --val-fraction:
            # val and train are those shares of train/, found again
            carved = split in ("train", "val") and "val" not in present and "train" in present
            if split != "all" and split not in present and not carved:
                raise D.DataError(f"evaluate: no {split}/ split in {root}")
            samples = []
            for s in present if split == "all" else ["train" if carved else split]:
                folder = root / s
                found, part = D.scan_folder(folder)
                if found != classes:
                    raise D.DataError(f"evaluate: {folder} has classes {found}, the checkpoint was trained on {classes}")
                samples += part
            if carved:
                samples = getattr(D.load_splits(root, **kw), split)
        else:
            # one folder ROOT/<class>/*: train split it with the run's seed and fractions, so its val and test
            # splits are found again; auto takes the test split when ROOT is the folder the run trained on
            trained_on = cfg.get("data") not in (None, "synthetic") and Path(cfg["data"]).resolve() == root.resolve()
            if split == "auto":
                split = "test" if trained_on and kw["test_fraction"] > 0 else "all"
            found, samples = D.scan_folder(root)
            if found != classes:
                raise D.DataError(f"evaluate: {root} has classes {found}, the checkpoint was trained on {classes}")
            if split != "all":
                samples = getattr(D.load_splits(root, **kw), split)
                if not samples:
                    raise D.DataError(f"evaluate: the {split} split of {root} (seed {kw['seed']}, --val-fraction "
                                      f"{kw['val_fraction']:g}, --test-fraction {kw['test_fraction']:g}, as in "
                                      f"training) is empty")
        D.check_images({split: samples}, progress=progress)
        ds = D.ImageFolderDataset(samples, classes, tf, pre["in_chans"])
        what = f"{split} split of {root}" if split != "all" else f"all of {root}"
    title = f"{what}, {Path(checkpoint).name} (epoch {ck.epoch})"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = cfg.get("class_weights_resolved")  # the run's loss, as its own validation and test losses were
    weight_t = torch.tensor(weights, device=dev) if weights is not None else None
    loader = _loader(ds, batch_size, data_workers(num_workers, dev, who="evaluate"), pin_memory=dev.type == "cuda")
    loss, labels, probs = predict(model, loader, dev,
                                  _amp_dtype(cfg.get("amp", "auto"), dev), weight_t, progress=progress)
    metrics = classification_metrics(labels, probs, classes) | {
        "loss": loss, "checkpoint": str(checkpoint), "epoch": ck.epoch, "data": str(data), "split": split}
    _write_eval_artifacts(out, "", labels, probs, classes, metrics, title)
    if gradcam > 0:
        mean = pre["mean"]
        std = pre["std"]
        metrics["gradcam"] = save_gradcams(model, ds, classes, out / "gradcam", gradcam, dev, mean, std, labels, title)
    _write_json(out / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------------------------ gradcam


def _last_stage_module(model: nn.Module) -> nn.Module:
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"Grad-CAM: {type(model).__name__} has no feature_info naming its last stage")
    name = info[-1]["module"]
    return model.get_submodule(name)


def gradcam(model: nn.Module, x: torch.Tensor, target: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Grad-CAM over the last fusion stage: ``(H, W)`` heatmap in [0, 1] at the input size, and the class used."""
    module = _last_stage_module(model)
    store: Dict[str, torch.Tensor] = {}

    def hook(_, __, output):
        feat = output[0] if isinstance(output, (tuple, list)) else output
        feat.retain_grad()
        store["feat"] = feat

    handle = module.register_forward_hook(hook)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(x[None].requires_grad_(False))
            cls = int(logits.argmax(-1)) if target is None else target
            logits[0, cls].backward()
    finally:
        handle.remove()
    feat = store["feat"]
    weights = feat.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feat).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min()).clamp_min(1e-12)
    return cam.detach(), cls


def spread_over_classes(labels: Sequence[int], n: int) -> List[int]:
    """``n`` sample indices taking the classes in turn (first unused sample of each class, in order)."""
    by_class: Dict[int, List[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    queues = [by_class[c][::-1] for c in sorted(by_class)]
    picked: List[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def save_gradcams(model, ds, classes, folder: Path, n: int, device, mean, std, labels=None, title: str = "") -> List[str]:
    """Grad-CAM heatmaps of ``n`` samples spread over the classes (``labels``: each sample's class)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("gradcam_*.png"):
        old.unlink()
    written = []
    c = ds[0][0].shape[0]
    mean_t = torch.tensor(mean * c if len(mean) == 1 else mean)[:c, None, None]
    std_t = torch.tensor(std * c if len(std) == 1 else std)[:c, None, None]
    if labels is None:
        labels = [ds[i][1] for i in range(len(ds))]
    for i in spread_over_classes(labels, n):
        x, y = ds[i]
        cam, cls = gradcam(model, x.to(device))
        img = (x * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        path = folder / f"gradcam_{len(written):03d}_{classes[y]}.png"
        head = f"true {classes[y]} / predicted {classes[cls]}"
        plots.save_heatmap(img, cam.cpu().numpy(), path, f"{head}\n{title}" if title else head)
        written.append(str(path))
    return written
