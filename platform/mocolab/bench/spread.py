"""The spread of a repeated measurement and whether it allows a verdict. Plain Python (the GPU check imports it).

Every ratio the benchmark reports keeps its per-repetition values: :class:`Spread` gives min / median / max, and a
spread wider than :data:`NOISE_TOLERANCE` around the median means the machine was too noisy for a verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

NOISE_TOLERANCE = 0.05
"""A figure whose min or max lies further than this fraction from its median is too noisy for a verdict."""


@dataclass(frozen=True)
class Spread:
    """Min, median and max of one figure over ``repeats`` repetitions."""

    min: float
    median: float
    max: float
    repeats: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(min(values), statistics.median(values), max(values), len(values))

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Spread:
        return cls(**record)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def relative(self) -> float:
        """The largest distance of min or max from the median, as a fraction of the median."""
        return max(self.max - self.median, self.median - self.min) / abs(self.median)

    @property
    def noisy(self) -> bool:
        """Wider than +-NOISE_TOLERANCE around the median: the repetitions disagree too much for a verdict."""
        return self.relative > NOISE_TOLERANCE
