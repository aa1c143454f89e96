"""PNG plots of a run: loss/accuracy curves, confusion matrix, ROC curves (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot_curves(history: List[Dict[str, float]], path: Path) -> None:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    a2.plot(epochs, [h["val"]["accuracy"] for h in history], "o-", label="val")
    a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "Confusion matrix") -> None:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(max(3.2, 1.2 + 0.7 * len(classes)), max(3.0, 1.4 + 0.7 * len(classes))))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(_wrap(title, max(24, 8 * len(classes))), fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], path: Path,
             title: str = "ROC (one-vs-rest)") -> None:
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        pos = y_true == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos.astype(int), probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(_wrap(title, 48), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_heatmap(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> None:
    """``image`` (H, W, C) in [0, 1], ``cam`` (H, W) in [0, 1] -> side-by-side image and overlay."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3.6))
    img = image[..., 0] if image.shape[-1] == 1 else image
    a1.imshow(img, cmap="gray" if img.ndim == 2 else None)
    a1.set_title("input")
    a2.imshow(img, cmap="gray" if img.ndim == 2 else None)
    a2.imshow(cam, cmap="jet", alpha=0.45)
    a2.set_title(title, fontsize=9)
    for a in (a1, a2):
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
