"""PNG plots with matplotlib (headless): training curves, confusion matrices, curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionpipe.io import atomic_path  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One panel per metric family (loss, accuracy-like, lr) over epochs."""
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float)) and k != "epoch"
                   and not k.endswith("seconds")})
    if not keys:
        return
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("/")[-1], []).append(k)
    n = len(groups)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for ax, (name, ks) in zip(axes.flat, groups.items(), strict=False):
        for k in ks:
            xs = [e for e, h in zip(epochs, history, strict=False) if k in h]
            ys = [h[k] for h in history if k in h]
            ax.plot(xs, ys, marker="o", ms=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Confusion matrix (rows = truth, columns = prediction), with counts."""
    m = np.asarray(matrix)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    hi = m.max() if m.size else 0
    if len(names) <= 30:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > hi / 2 else "black")
    fig.tight_layout()
    _save(fig, path)


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                xlabel: str, ylabel: str, title: str = "") -> None:
    """Several (x, y) curves in one panel, e.g. precision–recall per class."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def save_image_grid(images: Sequence[np.ndarray], path: str | os.PathLike, cols: int = 8,
                    titles: Sequence[str] | None = None) -> None:
    """HxWx3 uint8 images in a grid PNG (titles optional)."""
    n = len(images)
    cols = min(cols, n) or 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + (0.3 if titles else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            if titles:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    _save(fig, path)
