"""Running averages for progress bars and logs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


class Meter:
    """Weighted running average of named scalars (floats, or 0-d tensors summed where they live)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def update(self, values: dict[str, Any], n: int = 1) -> None:
        """Add ``values`` observed over ``n`` samples; tensors are not read back to the host here."""
        for k, v in values.items():
            self.sums[k] = self.sums[k] + (v.detach().double() * n if isinstance(v, torch.Tensor) else float(v) * n)
            self.counts[k] += n

    def averages(self) -> dict[str, float]:
        """The mean of each scalar so far."""
        return {k: float(self.sums[k]) / max(self.counts[k], 1e-12) for k in self.sums}

    def totals(self) -> dict[str, float]:
        """Sums and counts flattened (for all-reduce across ranks)."""
        out = {f"sum/{k}": float(v) for k, v in self.sums.items()}
        out.update({f"count/{k}": v for k, v in self.counts.items()})
        return out

    @staticmethod
    def averages_from_totals(totals: dict[str, float]) -> dict[str, float]:
        """Inverse of :meth:`totals` after a reduction."""
        return {k[4:]: v / max(totals.get("count/" + k[4:], 0.0), 1e-12)
                for k, v in totals.items() if k.startswith("sum/")}
