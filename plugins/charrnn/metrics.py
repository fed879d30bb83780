"""Metrics: accuracy / per-class F1 / confusion matrix, and loss / perplexity / bits per character."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

LN2 = math.log(2.0)


def classification_metrics(cm: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision/recall/F1 from a confusion matrix (rows = truth)."""
    total = int(cm.sum())
    tp = cm.diag().double()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    res: dict[str, Any] = {"acc": float(tp.sum()) / max(total, 1), "macro_f1": float(f1.mean()),
                           "chance_acc": 1.0 / len(class_names)}
    for i, c in enumerate(class_names):
        res[f"precision/{c}"] = float(precision[i])
        res[f"recall/{c}"] = float(recall[i])
        res[f"f1/{c}"] = float(f1[i])
    return res


def unigram_log_probs(counts: Sequence[int]) -> torch.Tensor:
    """Log-probabilities of each character under add-one smoothed training counts (padding excluded)."""
    c = torch.tensor(counts, dtype=torch.float64) + 1.0
    c[0] = 0.0  # padding is never a target
    return (c / c.sum()).log()


class LanguageModelMeter:
    """Sums negative log-likelihoods (model and unigram baseline) over every target character."""

    def __init__(self, unigram_counts: Sequence[int]) -> None:
        self.uni = unigram_log_probs(unigram_counts)
        self.nll = self.uni_nll = 0.0
        self.chars = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: logits [B, T, V], targets [B, T] (0 = padding, skipped)."""
        mask = targets != 0
        t = targets[mask]
        self.nll += float(torch.nn.functional.cross_entropy(logits[mask].float(), t, reduction="sum"))
        self.uni_nll -= float(self.uni[t.cpu()].sum())
        self.chars += int(mask.sum())

    def result(self) -> dict[str, float]:
        """loss (nats/char), perplexity, bits per character, and the unigram baseline's."""
        n = max(self.chars, 1)
        loss, uni = self.nll / n, self.uni_nll / n
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpc": loss / LN2,
                "unigram_bpc": uni / LN2, "unigram_ppl": math.exp(min(uni, 50.0)), "chars": self.chars}
