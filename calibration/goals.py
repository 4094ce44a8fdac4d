"""What the user asks calibration for: one frozen dataclass per goal, and the per-exit cost."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from edgeperceiver.bundle import Manifest, TargetEntry
from edgeperceiver.errors import CalibrationError, InputError

from .risk import Bound, RiskLoss


@dataclass(frozen=True)
class MaxDrop:
    """The lowest expected latency whose accuracy stays within ``points`` of the final exit's.

    Two guards against fitting the fitting part's noise (held-out sets are small: at 270
    samples one sample is 0.37 points): ``confidence``, the drop's one-sided normal upper
    confidence bound at that level must stay within ``points`` (0.5 = the plain estimate);
    and unless ``count_gains``, samples an early exit gets right while the final exit gets
    them wrong do not offset the ones it breaks (the bounded quantity is then the share the
    final exit gets right and the exit taken wrong, which is >= the accuracy drop).
    """

    points: float = 0.5
    confidence: float = 0.9
    count_gains: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.points) and self.points >= 0):
            raise InputError(f"max_drop must be a finite number of accuracy points >= 0, got {self.points}")
        if not 0.5 <= self.confidence < 1.0:
            raise InputError(f"max_drop confidence must be in [0.5, 1), got {self.confidence}")

    @property
    def z(self) -> float:
        """The normal quantile of ``confidence`` (0 at 0.5)."""
        return NormalDist().inv_cdf(self.confidence)

    def describe(self) -> str:
        extra = f"@{self.confidence:g}" if self.confidence != 0.9 else ""
        return f"max_drop={self.points:g}{extra}" + (",net" if self.count_gains else "")


@dataclass(frozen=True)
class Budget:
    """The best accuracy whose expected cost per sample fits ``ms`` (latency) or ``gflops``."""

    ms: float | None = None
    gflops: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.ms, self.gflops) if v is not None]
        if len(given) != 1:
            raise InputError("a budget needs exactly one of ms= or gflops=")
        if not (math.isfinite(given[0]) and given[0] > 0):
            raise InputError(f"a budget must be a positive number, got {given[0]}")

    @property
    def limit(self) -> float:
        return float(self.ms if self.ms is not None else self.gflops)  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"budget_ms={self.ms:g}" if self.ms is not None else f"budget_gflops={self.gflops:g}"


@dataclass(frozen=True)
class Risk:
    """Risk against the final exit <= ``eps`` with probability >= 1 - ``delta`` (Learn then Test)."""

    eps: float
    delta: float = 0.1
    loss: RiskLoss = RiskLoss.DISAGREEMENT
    bound: Bound = Bound.BINOMIAL

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise InputError(f"risk must be a share in (0, 1), got {self.eps}")
        if not 0.0 < self.delta < 1.0:
            raise InputError(f"delta must be a probability in (0, 1), got {self.delta}")
        object.__setattr__(self, "loss", RiskLoss(self.loss))
        object.__setattr__(self, "bound", Bound(self.bound))

    def describe(self) -> str:
        return f"risk={self.eps:g},delta={self.delta:g},{self.loss.value}"


@dataclass(frozen=True)
class PaperMix:
    """The paper's protocol: thresholds that send these shares of samples to each exit."""

    proportions: tuple[float, ...]

    def __post_init__(self) -> None:
        props = tuple(float(p) for p in self.proportions)
        if not props or any(not (0.0 <= p <= 1.0) for p in props) or sum(props) > 1.0 + 1e-4:
            raise InputError(f"exit proportions must be shares in [0, 1] summing to at most 1, got {props}")
        object.__setattr__(self, "proportions", props)

    def describe(self) -> str:
        return "paper_mix=" + ",".join(f"{p:.4g}" for p in self.proportions)


Goal = MaxDrop | Budget | Risk | PaperMix


def goal_from_options(
    *,
    max_drop: float | None = None,
    budget_ms: float | None = None,
    budget_gflops: float | None = None,
    risk: float | None = None,
    delta: float = 0.1,
    paper_mix: tuple[float, ...] | None = None,
) -> Goal:
    """The one goal the command-line options ask for (none: at most 0.5 points of accuracy lost)."""
    given = {
        "--max-drop": max_drop, "--budget-ms": budget_ms, "--budget-gflops": budget_gflops, "--risk": risk,
        "--paper-mix": paper_mix,
    }  # fmt: skip
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) > 1:
        raise InputError(f"choose one goal, got {', '.join(chosen)}")
    if budget_ms is not None:
        return Budget(ms=budget_ms)
    if budget_gflops is not None:
        return Budget(gflops=budget_gflops)
    if risk is not None:
        return Risk(risk, delta)
    if paper_mix is not None:
        return PaperMix(paper_mix)
    return MaxDrop(0.5 if max_drop is None else max_drop)


@dataclass(frozen=True)
class ExitCosts:
    """Cumulative cost to reach each exit, in ``unit`` (``ms``, ``GFLOPs`` or ``segments``)."""

    values: tuple[float, ...]
    unit: str
    source: str


def exit_costs(manifest: Manifest, entry: TargetEntry, *, unit: str | None = None) -> ExitCosts:
    """Measured latency (``entry.latency_ms`` from bench) when present, else cumulative FLOPs.

    ``unit="ms"`` or ``"GFLOPs"`` insists on one (a latency budget needs measured latency);
    without either, the number of segments run is the cost.
    """
    k = len(manifest.segments)
    have_ms = len(entry.latency_ms) == k and all(math.isfinite(v) and v > 0 for v in entry.latency_ms)
    macs = [s.flops for s in manifest.segments]
    have_flops = all(m > 0 for m in macs)
    if unit == "ms" or (unit is None and have_ms):
        if not have_ms:
            raise CalibrationError(
                f"target {entry.key} has no measured latency per exit: run 'edgeperceiver bench BUNDLE "
                f"--target {entry.key}' first, or give the budget in GFLOPs"
            )
        return monotone(ExitCosts(tuple(float(v) for v in entry.latency_ms), "ms",
                                  f"latency measured on {entry.key} (batch 1)"))
    if unit == "GFLOPs" or (unit is None and have_flops):
        if not have_flops:
            raise CalibrationError("the bundle records no FLOPs per segment; a GFLOPs budget cannot be checked")
        cum, total = [], 0
        for m in macs:
            total += m
            cum.append(total / 1e9)
        return ExitCosts(tuple(cum), "GFLOPs", "FLOPs (multiply-accumulates) from the export")
    if unit is not None:
        raise InputError(f"unknown cost unit {unit!r} (use 'ms' or 'GFLOPs')")
    return ExitCosts(tuple(float(i + 1) for i in range(k)), "segments", "segments run (no latency or FLOPs recorded)")


def monotone(costs: ExitCosts) -> ExitCosts:
    """Costs made non-decreasing (a later exit runs everything an earlier one does).

    Measured latencies on a noisy machine can come out non-monotone; the running maximum
    is used then, and the source says so.
    """
    fixed: list[float] = []
    for v in costs.values:
        fixed.append(max(v, fixed[-1]) if fixed else v)
    if fixed == list(costs.values):
        return costs
    return ExitCosts(tuple(fixed), costs.unit, costs.source + "; made non-decreasing (measurement noise)")
