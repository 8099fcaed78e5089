"""Paired differences, their 95% Student-t intervals and the verdict of each claim part
(rules in :func:`divmoe.compare.seed_claims.rules_text`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .seed_claims import Claim, Part

# two-sided 95% Student t quantiles, df = 1..30 (scipy.stats.t.ppf(0.975, df) to 3 decimals)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"an interval needs at least 2 paired values (df={df})")
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # within 0.002 beyond 30


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Interval":
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
        half = t975(n - 1) * sd / math.sqrt(n)
        return cls(mean, mean - half, mean + half, sd, n)


def _transform(part: Part, a: float, b: float) -> float:
    """The paired quantity of one seed: A − B, or log(A / B) for a ratio (log2 speed-ups are
    per-seed values already: A carries them, B is 0)."""
    if part.ratio:
        if a <= 0 or b <= 0:
            raise ValueError(f"{part.metric}: a ratio needs positive values, got {a} and {b}")
        return math.log(a / b)
    return a - b


def _thresholds(part: Part) -> float:
    """δ or m on the scale of the paired quantity, signed so that the claimed side is +."""
    if not part.ratio:
        return part.delta
    if part.kind == "better":
        return -math.log(1 - part.delta) if part.lower else math.log(1 + part.delta)
    return math.log(1 + part.delta)


def decide(part: Part, iv: Interval) -> str:
    """yes / no / unclear (``better``) or holds / fails / unclear (``no_worse``, ``equal``)."""
    d = _thresholds(part)
    if part.kind == "better":
        sign = -1.0 if part.lower else 1.0  # the claimed side made positive
        low, high = sorted((sign * iv.low, sign * iv.high))
        mean = sign * iv.mean
        if low > 0 and mean >= d:
            return "yes"
        if high < d:
            return "no"
        return "unclear"
    if part.kind == "no_worse":  # worse is higher for every metric judged this way
        if iv.high < d:
            return "holds"
        if iv.low > d:
            return "fails"
        return "unclear"
    if part.kind == "equal":
        if -d < iv.low and iv.high < d:
            return "holds"
        if iv.low > d or iv.high < -d:
            return "fails"
        return "unclear"
    raise ValueError(f"part kind {part.kind!r} is not allowed: expected better, no_worse or equal")


def verdict(parts: list[str]) -> str:
    if all(p in ("yes", "holds") for p in parts):
        return "reproduced"
    if any(p in ("no", "fails") for p in parts):
        return "not reproduced"
    return "inconclusive"


def judge(claim: Claim, values: dict[str, dict[str, list[float]]]) -> dict:
    """``values[metric][variant]`` = per-seed numbers (seed order; the speed-up is given as
    ``values["speedup"][A]`` in log2 with B all zeros). Returns every part's per-seed paired
    values, interval and decision, and the claim's verdict."""
    a_name, b_name = claim.variants
    parts = []
    for part in claim.parts:
        a, b = values[part.metric][a_name], values[part.metric][b_name]
        if len(a) != len(b):
            raise ValueError(f"claim {claim.number}: {len(a)} seeds of {a_name} but {len(b)} "
                             f"of {b_name}; the pairs must match")
        paired = [_transform(part, x, y) for x, y in zip(a, b)]
        iv = Interval.of(paired)
        parts.append({"part": part, "a": a, "b": b, "paired": paired, "interval": iv,
                      "decision": decide(part, iv)})
    return {"claim": claim, "parts": parts, "verdict": verdict([p["decision"] for p in parts])}
