"""Train and evaluate fusionblocks models the way the papers do.

:func:`train` writes into its output folder: ``metrics.json`` (config, classes, one entry per epoch with
train loss/accuracy, validation loss and the full metric set, lr and time; the test-set metrics of the
best checkpoint at the end), ``last.pt`` and ``best.pt`` (model + optimizer + scheduler + epoch + config +
RNG state, written atomically), and the plots ``curves.png``, ``confusion_matrix.png``, ``roc.png``.
``resume=True`` continues from ``last.pt`` exactly: data order and augmentation are seeded per epoch.

:func:`evaluate` loads a checkpoint and writes the same metrics and plots for a data folder, plus
Grad-CAM heatmaps of the last fusion stage when asked.

Multi-GPU: launch with ``torchrun --nproc-per-node N -m fusionblocks train ...`` (DDP; rank 0 writes).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..models.registry import create_model
from . import data as D
from . import plots
from .recipes import Recipe, build_optimizer, build_scheduler, get_recipe, resolve_class_weights
from .transforms import build as build_transform

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint and in ``metrics.json``."""

    model: str
    data: str
    out: str
    recipe: str = "hifuse"
    epochs: Optional[int] = None  # None: the recipe's
    batch_size: Optional[int] = None  # None: the recipe's
    image_size: int = 224
    lr: Optional[float] = None
    in_chans: int = 3
    class_weights: Optional[object] = "recipe"  # "recipe" | "none" | "balanced" | list of floats
    seed: int = 0
    num_workers: int = 0
    amp: str = "auto"  # auto | bf16 | fp16 | none
    compile: bool = False
    grad_checkpointing: bool = False
    resume: bool = False
    device: Optional[str] = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    synthetic_samples: int = 64
    synthetic_classes: int = 2
    max_steps_per_epoch: Optional[int] = None
    class_names: Optional[List[str]] = None  # for a .npz without medmnist installed
    progress: bool = True
    model_kwargs: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- setup


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def _device(requested: Optional[str], local_rank: int) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _datasets(cfg: TrainConfig, recipe: Recipe):
    mean, std = recipe.mean, recipe.std
    train_tf = build_transform(True, recipe.augment, cfg.image_size, mean, std)
    eval_tf = build_transform(False, recipe.augment, cfg.image_size, mean, std)
    if cfg.data == "synthetic":
        n, k = cfg.synthetic_samples, cfg.synthetic_classes
        size = max(cfg.image_size, 32)
        mk = lambda num, seed, tf: D.SyntheticDataset(num, k, size, cfg.in_chans, tf, seed)  # noqa: E731
        train = mk(n, cfg.seed, train_tf)
        val = mk(max(n // 4, k), cfg.seed + 1, eval_tf)
        test = mk(max(n // 4, k), cfg.seed + 2, eval_tf)
        counts = [len(range(c, n, k)) for c in range(k)]
        return train.classes, train, val, test, counts
    splits = D.load_splits(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                           class_names=cfg.class_names)
    if not splits.val:
        raise D.DataError(f"{cfg.data}: the validation split is empty (add images or a val/ folder)")
    mk = lambda s, tf: D.ImageFolderDataset(s, splits.classes, tf, cfg.in_chans, cfg.seed)  # noqa: E731
    counts = D.class_counts(splits.train, len(splits.classes))
    test = mk(splits.test, eval_tf) if splits.test else None
    return splits.classes, mk(splits.train, train_tf), mk(splits.val, eval_tf), test, counts


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


def _loader(ds: Dataset, batch_size: int, num_workers: int, sampler=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      drop_last=False, persistent_workers=num_workers > 0)


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, leave=False, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: Dict[str, object]) -> None:
    """Atomic: write a temporary file beside ``path``, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> Dict[str, object]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "config", "classes"):
        if key not in ckpt:
            raise KeyError(f"{path} is not a fusionblocks checkpoint: no {key!r} entry")
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, object]) -> nn.Module:
    cfg = ckpt["config"]
    model = create_model(cfg["model"], num_classes=len(ckpt["classes"]), **_model_kwargs(cfg))
    model.load_state_dict(ckpt["model"])
    return model


def _model_kwargs(cfg: Dict[str, object]) -> Dict[str, object]:
    kw = dict(cfg.get("model_kwargs") or {})
    if cfg.get("in_chans", 3) != 3:
        kw.setdefault("in_chans", cfg["in_chans"])
    return kw


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: Optional[torch.dtype],
            weight: Optional[torch.Tensor] = None, progress: bool = False):
    """(mean loss, labels (N,), probabilities (N, K))."""
    model.eval()
    losses, labels, probs = [], [], []
    for x, y in _progress(loader, progress, desc="eval"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        logits = logits.float()
        losses.append(F.cross_entropy(logits, y, weight=weight, reduction="sum").item())
        labels.append(y.cpu())
        probs.append(logits.softmax(-1).cpu())
    n = sum(len(t) for t in labels)
    return sum(losses) / max(n, 1), torch.cat(labels).numpy(), torch.cat(probs).numpy()


def _write_eval_artifacts(out: Path, prefix: str, labels, probs, classes, metrics) -> None:
    plots.plot_confusion(metrics["confusion_matrix"], classes, out / f"{prefix}confusion_matrix.png")
    plots.plot_roc(labels, probs, classes, out / f"{prefix}roc.png")


# ------------------------------------------------------------------------------------------------ train


def train(cfg: TrainConfig) -> Dict[str, object]:
    """Run a training job; returns the content of ``metrics.json``."""
    from .metrics import classification_metrics

    recipe = get_recipe(cfg.recipe)
    epochs = cfg.epochs or recipe.epochs
    batch_size = cfg.batch_size or recipe.batch_size
    rank, local_rank, world = _distributed()
    device = _device(cfg.device, local_rank)
    amp = _amp_dtype(cfg.amp, device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    classes, train_ds, val_ds, test_ds, counts = _datasets(cfg, recipe)
    model = create_model(cfg.model, num_classes=len(classes), **_model_kwargs(asdict(cfg))).to(device)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"train: model {cfg.model!r} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    spec = recipe.class_weights if cfg.class_weights == "recipe" else cfg.class_weights
    weights = resolve_class_weights(spec, classes, counts)
    weight_t = torch.tensor(weights, device=device) if weights is not None else None

    sampler = _EpochSampler(len(train_ds), cfg.seed, rank, world)
    train_loader = _loader(train_ds, batch_size, cfg.num_workers, sampler)
    val_loader = _loader(val_ds, batch_size, cfg.num_workers)
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    optimizer = build_optimizer(model, recipe, cfg.lr)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, epochs, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, best, history = 0, -1.0, []
    if cfg.resume:
        ckpt = load_checkpoint(out / "last.pt")
        if ckpt["config"]["model"] != cfg.model or list(ckpt["classes"]) != list(classes):
            raise ValueError(
                f"train --resume: {out / 'last.pt'} was trained as {ckpt['config']['model']} on {ckpt['classes']}, "
                f"this run is {cfg.model} on {classes}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best, history = int(ckpt["epoch"]) + 1, float(ckpt["best_metric"]), list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"])

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    cfg_dict = asdict(cfg) | {"epochs": epochs, "batch_size": batch_size, "class_weights_resolved": weights}
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        train_model.train()
        loss_sum, correct, seen = 0.0, 0, 0
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
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
        if rank != 0:
            continue
        val_loss, labels, probs = predict(model, val_loader, device, amp, weight_t)
        val_metrics = classification_metrics(labels, probs, classes)
        entry = {
            "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss, "val": val_metrics, "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0,
        }
        history.append(entry)
        improved = val_metrics["accuracy"] > best
        best = max(best, val_metrics["accuracy"])
        payload = {
            "version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "config": cfg_dict, "classes": list(classes),
            "best_metric": best, "history": history, "rng": torch.get_rng_state(),
        }
        save_checkpoint(out / "last.pt", payload)
        if improved:
            save_checkpoint(out / "best.pt", payload)
            _write_eval_artifacts(out, "", labels, probs, classes, val_metrics)
        result = {"config": cfg_dict, "classes": list(classes), "epochs": history, "best_val_accuracy": best}
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        plots.plot_curves(history, out / "curves.png")

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {}
    result = json.loads((out / "metrics.json").read_text())
    if test_ds is not None and len(test_ds):
        best_model = model_from_checkpoint(load_checkpoint(out / "best.pt")).to(device)
        test_loss, labels, probs = predict(best_model, _loader(test_ds, batch_size, cfg.num_workers), device, amp, weight_t)
        result["test"] = classification_metrics(labels, probs, classes) | {"loss": test_loss}
        _write_eval_artifacts(out, "test_", labels, probs, classes, result["test"])
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(checkpoint: str | Path, data: str, out: str | Path, *, split: str = "auto", batch_size: int = 32,
             gradcam: int = 0, device: Optional[str] = None, num_workers: int = 0, progress: bool = True) -> Dict[str, object]:
    """Metrics, confusion matrix and ROC of a checkpoint on a data folder (``split``: test, val, all or auto)."""
    from .metrics import classification_metrics

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    classes = list(ckpt["classes"])
    recipe = get_recipe(cfg["recipe"])
    dev = _device(device, 0)
    model = model_from_checkpoint(ckpt).to(dev).eval()
    tf = build_transform(False, recipe.augment, cfg["image_size"], recipe.mean, recipe.std)
    if data == "synthetic":
        ds = D.SyntheticDataset(max(cfg.get("synthetic_samples", 64) // 4, len(classes)), len(classes),
                                max(cfg["image_size"], 32), cfg.get("in_chans", 3), tf, cfg.get("seed", 0) + 2)
    elif str(data).lower().endswith(".npz"):
        from .medmnist import eval_samples

        ds = D.ImageFolderDataset(eval_samples(data, split, classes), classes, tf, cfg.get("in_chans", 3))
    else:
        root = Path(data)
        has_splits = any((root / s).is_dir() for s in D.SPLITS)
        if split == "auto":
            split = "test" if (root / "test").is_dir() else ("val" if (root / "val").is_dir() else "all")
        folder = root / split if (has_splits and split != "all") else root
        if has_splits and split != "all" and not folder.is_dir():
            raise D.DataError(f"evaluate: no {split}/ split in {root}")
        found, samples = D.scan_folder(folder)
        if found != classes:
            raise D.DataError(f"evaluate: {folder} has classes {found}, the checkpoint was trained on {classes}")
        ds = D.ImageFolderDataset(samples, classes, tf, cfg.get("in_chans", 3))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loss, labels, probs = predict(model, _loader(ds, batch_size, num_workers), dev, _amp_dtype(cfg.get("amp", "auto"), dev), progress=progress)
    metrics = classification_metrics(labels, probs, classes) | {"loss": loss, "checkpoint": str(checkpoint), "data": str(data)}
    _write_eval_artifacts(out, "", labels, probs, classes, metrics)
    if gradcam > 0:
        metrics["gradcam"] = save_gradcams(model, ds, classes, out / "gradcam", gradcam, dev, recipe)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
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


def save_gradcams(model, ds, classes, folder: Path, n: int, device, recipe: Recipe) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    mean = torch.tensor(recipe.mean)[:, None, None]
    std = torch.tensor(recipe.std)[:, None, None]
    for i in range(min(n, len(ds))):
        x, y = ds[i]
        cam, cls = gradcam(model, x.to(device))
        img = (x * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        path = folder / f"gradcam_{i:03d}.png"
        plots.save_heatmap(img, cam.cpu().numpy(), path, f"true {classes[y]} / predicted {classes[cls]}")
        written.append(str(path))
    return written
