"""What a calibration chose and every figure behind it, as the text the CLI prints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgeperceiver.bundle import Thresholds
from edgeperceiver.types import Criterion

from .goals import ExitCosts, Goal
from .policies import OperatingPoint
from .report import CurvePoint, render_table, threshold_text
from .risk import RiskFit


@dataclass(frozen=True)
class CalibrationResult:
    """Chosen thresholds and every figure behind them (shares/accuracies in [0, 1]).

    ``fit``/``check`` are the chosen thresholds on the fitting/checking parts,
    ``final_fit``/``final_check`` the baseline of always running to the last enabled exit.
    ``met`` says whether the goal holds on the checking part (``None``: nothing to check).
    """

    target: str
    goal: Goal
    criterion: Criterion
    thresholds: Thresholds
    costs: ExitCosts
    exits: tuple[int, ...]  #: 1-based exits allowed to fire
    fit: OperatingPoint
    check: OperatingPoint
    final_fit: OperatingPoint
    final_check: OperatingPoint
    met: bool | None
    curve: tuple[CurvePoint, ...] = ()
    exit_alone: tuple[float | None, ...] = ()  #: each exit's accuracy on every checking sample
    risk: RiskFit | None = None
    check_risk: float | None = None
    skipped: int = 0
    notes: tuple[str, ...] = ()
    report_files: tuple[str, ...] = ()

    @property
    def speedup(self) -> float:
        """Mean cost of always running to the final exit / mean cost of the chosen thresholds."""
        return self.final_check.cost / self.check.cost if self.check.cost > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        """The JSON-able summary stored in ``TargetEntry.calibration``."""

        def point(p: OperatingPoint) -> dict[str, Any]:
            return {
                "n": p.n, "accuracy": p.accuracy, "agreement": p.agreement, "cost": p.cost,
                "share": list(p.share), "exit_accuracy": list(p.exit_accuracy),
            }

        out: dict[str, Any] = {
            "goal": self.goal.describe(),
            "criterion": self.criterion.value,
            "exits": list(self.exits),
            "cost_unit": self.costs.unit,
            "cost_source": self.costs.source,
            "exit_costs": list(self.costs.values),
            "fit": point(self.fit),
            "check": point(self.check),
            "final_check": point(self.final_check),
            "exit_accuracy_all_check": list(self.exit_alone),
            "met_on_check": self.met,
            "speedup_vs_final": self.speedup,
            "skipped_unreadable": self.skipped,
            "report_files": list(self.report_files),
            "notes": list(self.notes),
        }
        if self.risk is not None:
            out["risk"] = {
                "tau": self.risk.tau, "empirical_risk_fit": self.risk.empirical_risk,
                "p_value": self.risk.p_value, "certified_levels": self.risk.certified,
                "min_samples": self.risk.min_samples, "risk_check": self.check_risk,
            }
        return out

    def render(self) -> str:
        """A terminal report: per-exit table, goal figures on fit and check parts, files."""
        unit = self.costs.unit
        lines = [
            f"calibrated {self.target} for {self.goal.describe()} on criterion {self.criterion.value}: "
            f"{self.fit.n} fitting / {self.check.n} checking samples"
            + (f" ({self.skipped} unreadable images skipped)" if self.skipped else ""),
            "",
        ]
        rows = []
        alone = self.exit_alone or (None,) * len(self.costs.values)
        for k in range(len(self.costs.values)):
            exit_acc, all_acc = self.check.exit_accuracy[k], alone[k]
            rows.append([
                str(k + 1), threshold_text(self.thresholds.values[k]), f"{100 * self.check.share[k]:.1f}%",
                "-" if exit_acc is None else f"{100 * exit_acc:.1f}%",
                "-" if all_acc is None else f"{100 * all_acc:.1f}%", f"{self.costs.values[k]:.4g}",
            ])
        head = ["exit", "threshold", "share", "acc. of its samples", "acc. on all", f"cost to exit ({unit})"]
        lines.append(render_table(head, rows))
        lines.append("")

        def acc(p: OperatingPoint) -> str:
            return "-" if p.accuracy is None else f"{100 * p.accuracy:.2f}%"

        def drop(p: OperatingPoint, base: OperatingPoint) -> str:
            if p.accuracy is None or base.accuracy is None:
                return "-"
            return f"{100 * (p.accuracy - base.accuracy):+.2f} pts"

        table = [
            ["accuracy", acc(self.fit), acc(self.check), acc(self.final_check)],
            ["vs final exit", drop(self.fit, self.final_fit), drop(self.check, self.final_check), ""],
            ["agrees with final exit", f"{100 * self.fit.agreement:.2f}%", f"{100 * self.check.agreement:.2f}%", ""],
            [f"mean cost ({unit})", f"{self.fit.cost:.4g}", f"{self.check.cost:.4g}", f"{self.final_check.cost:.4g}"],
        ]
        lines.append(render_table(["", "fit", "check", "final exit (check)"], table))
        verdict = {True: "met", False: "NOT met", None: "n/a"}[self.met]
        lines += ["", f"goal on the checking part: {verdict}; {self.speedup:.2f}x less mean cost than the final exit"
                  f" (costs: {self.costs.source})"]
        if self.risk is not None:
            lines.append(
                f"risk control: certified tau={self.risk.tau}, fit risk {self.risk.empirical_risk:.4f}, "
                f"p={self.risk.p_value:.3g}; check risk "
                + ("-" if self.check_risk is None else f"{self.check_risk:.4f}")
            )
        lines += [f"note: {n}" for n in self.notes]
        if self.report_files:
            lines.append("report: " + ", ".join(self.report_files))
        return "\n".join(lines)


@dataclass(frozen=True)
class ManualThresholds:
    """Thresholds set by hand (``set_thresholds``)."""

    target: str
    thresholds: Thresholds
    never_fires: tuple[int, ...] = field(default=())  #: 1-based exits whose value no score reaches
    last_exit: int = 0

    def render(self) -> str:
        rows = []
        for k, v in enumerate(self.thresholds.values, start=1):
            if v is None:
                what = "off"
            elif k == self.last_exit:
                what = "takes every remaining sample"
            elif k in self.never_fires:
                what = "never fires"
            else:
                what = f"leaves when {self.thresholds.criterion.value} >= {v:g}"
            rows.append([str(k), threshold_text(v), what])
        return f"thresholds of {self.target} set by hand:\n" + render_table(["exit", "threshold", "meaning"], rows)
