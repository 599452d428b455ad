"""The benchmark's statistics (scripts/benchmark.py; docs/benchmark.md): the mean and standard error over
seeds, and a rule's paired difference to a reference (BPTT) on the same seeds with a t interval on n - 1
degrees of freedom. No jax here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence


@dataclasses.dataclass
class MeanSE:
    mean: float
    se: Optional[float]   # None for one value
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return ''
        if self.se is None:
            return f'{self.mean:.{digits}f} (1)'
        return f'{self.mean:.{digits}f} +- {self.se:.{digits}f} ({self.n})'


def mean_se(values: Sequence[float]) -> MeanSE:
    """The mean and its standard error, the sample standard deviation (n - 1) over sqrt(n)."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return MeanSE(float('nan'), None, 0)
    m = sum(v) / n
    if n == 1:
        return MeanSE(m, None, 1)
    return MeanSE(m, math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n), n)


def t_quantile(p: float, dof: int) -> float:
    """The p quantile of Student's t with dof degrees of freedom."""
    from scipy import stats
    return float(stats.t.ppf(p, dof))


@dataclasses.dataclass
class PairedDiff:
    mean: float              # mean over the paired seeds of (rule - reference)
    low: Optional[float]     # the interval; None with fewer than two pairs
    high: Optional[float]
    n: int                   # the seeds both have
    seeds: tuple

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return ''
        if self.low is None:
            return f'{self.mean:+.{digits}f} (1 seed: no interval)'
        return f'{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] ({self.n})'


def paired_difference(rule: dict, reference: dict, level: float = 0.95) -> PairedDiff:
    """rule, reference: {seed: value}. The difference rule - reference on the seeds both have: its mean and
    the `level` interval mean +- t_{(1+level)/2, n-1} s_d / sqrt(n), s_d the standard deviation of the
    differences (n - 1)."""
    seeds = tuple(sorted(set(rule) & set(reference)))
    d = [float(rule[s]) - float(reference[s]) for s in seeds]
    n = len(d)
    if n == 0:
        return PairedDiff(float('nan'), None, None, 0, seeds)
    m = sum(d) / n
    if n == 1:
        return PairedDiff(m, None, None, 1, seeds)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
    half = t_quantile((1 + level) / 2, n - 1) * se
    return PairedDiff(m, m - half, m + half, n, seeds)
