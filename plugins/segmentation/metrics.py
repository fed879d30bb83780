"""Segmentation metrics from a pixel confusion matrix: IoU, Dice, pixel accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def update_confusion(cm: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Add one batch of predicted and true class indices to ``cm`` (rows truth, columns prediction)."""
    n = cm.shape[0]
    keep = (target != ignore_index) & (target >= 0) & (target < n)
    idx = target[keep].long() * n + pred[keep].long()
    cm += torch.bincount(idx, minlength=n * n).reshape(n, n).to(cm.device)


def scores(cm: np.ndarray, names: list[str]) -> dict[str, Any]:
    """mIoU, per-class IoU and Dice, pixel accuracy, mean class accuracy, mDice.

    Means run over classes present in the truth or the prediction; a class absent from both
    has no IoU and is left out of the per-class keys (it would be 0/0).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    truth, predicted = cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    dice = np.divide(2 * tp, truth + predicted, out=np.zeros_like(tp), where=present)
    acc = np.divide(tp, truth, out=np.zeros_like(tp), where=truth > 0)
    total = cm.sum()
    res: dict[str, Any] = {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mAcc": float(acc[truth > 0].mean()) if (truth > 0).any() else 0.0,
        "mDice": float(dice[present].mean()) if present.any() else 0.0,
    }
    for i, name in enumerate(names):
        if present[i]:
            res[f"IoU/{name}"] = float(iou[i])
            res[f"Dice/{name}"] = float(dice[i])
    return res
