"""Running averages for progress bars and logs."""

from __future__ import annotations

from collections import defaultdict


class Meter:
    """Weighted running average of named scalars."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def update(self, values: dict[str, float], n: int = 1) -> None:
        """Add ``values`` observed over ``n`` samples."""
        for k, v in values.items():
            self.sums[k] += float(v) * n
            self.counts[k] += n

    def averages(self) -> dict[str, float]:
        """The mean of each scalar so far."""
        return {k: self.sums[k] / max(self.counts[k], 1e-12) for k in self.sums}

    def totals(self) -> dict[str, float]:
        """Sums and counts flattened (for all-reduce across ranks)."""
        out = {f"sum/{k}": v for k, v in self.sums.items()}
        out.update({f"count/{k}": v for k, v in self.counts.items()})
        return out

    @staticmethod
    def averages_from_totals(totals: dict[str, float]) -> dict[str, float]:
        """Inverse of :meth:`totals` after a reduction."""
        return {k[4:]: v / max(totals.get("count/" + k[4:], 0.0), 1e-12)
                for k, v in totals.items() if k.startswith("sum/")}
