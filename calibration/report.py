"""The calibration report: accuracy-cost curve (CSV, PNG), exit shares and accuracies, a text table.

The curve is built on the fitting part and measured on the checking part: the paper's 33
exit mixes and the best-accuracy thresholds for a ladder of cost budgets, each evaluated
on the checking samples; the points no other point beats on both accuracy and cost form
the Pareto front. matplotlib (the ``calibrate`` extra) is imported only to draw the PNG.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .goals import ExitCosts
from .paper import mix_thresholds, paper_mixes
from .policies import OperatingPoint, budget, evaluate

BUDGET_STEPS = 12


@dataclass(frozen=True)
class CurvePoint:
    """One operating point of the curve: how it was made, and its figures on both parts."""

    source: str  #: "exit 2", "paper mix 7", "budget 1.25"
    fit: OperatingPoint
    check: OperatingPoint
    pareto: bool = False


def _quality(p: OperatingPoint) -> float:
    return p.accuracy if p.accuracy is not None else p.agreement


def pareto_flags(points: Sequence[OperatingPoint]) -> list[bool]:
    """True for points that no other point beats (>= quality and <= cost, one strictly)."""
    q = np.array([_quality(p) for p in points])
    c = np.array([p.cost for p in points])
    flags = []
    for i in range(len(points)):
        dominated = ((q >= q[i]) & (c <= c[i]) & ((q > q[i]) | (c < c[i]))).any()
        flags.append(not bool(dominated))
    return flags


def build_curve(
    fit_scores: np.ndarray,
    fit_preds: np.ndarray,
    fit_labels: np.ndarray | None,
    check_scores: np.ndarray,
    check_preds: np.ndarray,
    check_labels: np.ndarray | None,
    costs: ExitCosts,
    allowed: Sequence[int],
) -> tuple[CurvePoint, ...]:
    """Single exits, the paper's mixes and (with labels) a ladder of budgets, fitted then checked."""
    k_count = fit_scores.shape[0]
    made: list[tuple[str, tuple[float | None, ...]]] = []
    for k in allowed:
        made.append((f"exit {k + 1}", tuple(0.0 if j == k else None for j in range(k_count))))
    sub = fit_scores[list(allowed)]
    for i, mix in enumerate(paper_mixes(len(allowed)), start=1):
        t: list[float | None] = [None] * k_count
        for pos, v in enumerate(mix_thresholds(sub, mix)):
            t[allowed[pos]] = v if pos < len(allowed) - 1 else 0.0
        made.append((f"paper mix {i}", tuple(t)))
    if fit_labels is not None and len(allowed) > 1:
        lo, hi = costs.values[allowed[0]], costs.values[allowed[-1]]
        for b in np.linspace(lo, hi, BUDGET_STEPS + 2)[1:-1]:
            th = budget(fit_scores, fit_preds, fit_labels, costs.values, float(b), allowed)
            made.append((f"budget {b:.4g}", th))
    points = []
    for source, th in made:
        fit = evaluate(fit_scores, fit_preds, fit_labels, th, costs.values)
        check = evaluate(check_scores, check_preds, check_labels, th, costs.values)
        points.append((source, fit, check))
    flags = pareto_flags([c for _, _, c in points])
    return tuple(CurvePoint(s, f, c, p) for (s, f, c), p in zip(points, flags, strict=True))


# --------------------------------------------------------------------------- files


def _fmt(v: float | None, digits: int = 6) -> str:
    if v is None:
        return ""
    if math.isinf(v):
        return "never" if v > 0 else "all"
    return f"{v:.{digits}g}"


def threshold_text(v: float | None) -> str:
    """How one threshold reads in tables: ``off``, ``never``, or the value."""
    if v is None:
        return "off"
    if math.isinf(v):
        return "never" if v > 0 else "all"
    return f"{v:.4g}"


def csv_bytes(
    curve: Sequence[CurvePoint],
    chosen_fit: OperatingPoint,
    chosen_check: OperatingPoint,
    goal: str,
    costs: ExitCosts,
) -> bytes:
    """The report as CSV: one row per curve point plus the chosen one (figures in percent)."""
    k_count = len(costs.values)
    head = ["kind", "source", "pareto"]
    head += [f"threshold_{k + 1}" for k in range(k_count)]
    head += ["fit_accuracy_pct", f"fit_cost_{costs.unit}", "check_accuracy_pct", "check_agreement_pct",
             f"check_cost_{costs.unit}"]
    head += [f"check_share_{k + 1}_pct" for k in range(k_count)]
    head += [f"check_exit_accuracy_{k + 1}_pct" for k in range(k_count)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)

    def pct(v: float | None) -> str:
        return "" if v is None else f"{100 * v:.3f}"

    def row(kind: str, source: str, pareto: bool | None, fit: OperatingPoint, check: OperatingPoint) -> list[str]:
        return [kind, source, "" if pareto is None else str(int(pareto))] + [
            _fmt(t) if t is not None else "off" for t in check.thresholds
        ] + [pct(fit.accuracy), f"{fit.cost:.6g}", pct(check.accuracy), pct(check.agreement), f"{check.cost:.6g}"] + [
            pct(s) for s in check.share
        ] + [pct(a) for a in check.exit_accuracy]

    w.writerow(row("chosen", goal, None, chosen_fit, chosen_check))
    for p in curve:
        w.writerow(row("curve", p.source, p.pareto, p.fit, p.check))
    return buf.getvalue().encode("utf-8")


def pareto_png(
    curve: Sequence[CurvePoint],
    chosen: OperatingPoint,
    costs: ExitCosts,
    title: str,
    *,
    hline: tuple[float, str] | None = None,
    vline: tuple[float, str] | None = None,
) -> bytes:
    """The accuracy-cost plot (checking part) and the chosen point's exit shares, as PNG bytes.

    ``hline`` (quality in %, label) and ``vline`` (cost, label) draw the goal's bound.
    """
    from edgeperceiver._optional import require

    mpl = require("matplotlib", purpose="the calibration report's plot")
    mpl.use("Agg", force=True)
    from matplotlib.figure import Figure

    labeled = chosen.accuracy is not None
    ylabel = "accuracy on checking part (%)" if labeled else "agreement with final exit (%)"
    fig = Figure(figsize=(10, 4.2), dpi=110)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    singles = [p for p in curve if p.source.startswith("exit ")]
    others = [p for p in curve if not p.source.startswith("exit ")]
    front = sorted((p for p in curve if p.pareto), key=lambda p: p.check.cost)
    ax.scatter([p.check.cost for p in others], [100 * _quality(p.check) for p in others], s=14, c="0.65",
               label="paper mixes / budgets")
    if front:
        ax.plot([p.check.cost for p in front], [100 * _quality(p.check) for p in front], "-", c="tab:blue",
                lw=1.5, label="Pareto front")
    for p in singles:
        ax.scatter([p.check.cost], [100 * _quality(p.check)], marker="s", s=36, c="tab:green")
        ax.annotate(p.source, (p.check.cost, 100 * _quality(p.check)), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    if hline is not None:
        ax.axhline(hline[0], ls="--", c="tab:red", lw=1, alpha=0.7, label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], ls="--", c="tab:red", lw=1, alpha=0.7, label=vline[1])
    ax.scatter([chosen.cost], [100 * _quality(chosen)], marker="*", s=180, c="tab:red", zorder=5, label="chosen")
    ax.set_xlabel(f"mean cost per sample ({costs.unit})")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.6)
    exits = np.arange(1, len(chosen.share) + 1)
    bx.bar(exits, [100 * s for s in chosen.share], color="tab:blue")
    for k, (s, a) in enumerate(zip(chosen.share, chosen.exit_accuracy, strict=True), start=1):
        if s > 0 and a is not None:
            bx.annotate(f"{100 * a:.1f}%", (k, 100 * s), ha="center", va="bottom", fontsize=8)
    bx.set_xticks(exits)
    bx.set_xlabel("exit (label: accuracy of its samples)")
    bx.set_ylabel("share of samples (%)")
    bx.set_title("chosen operating point", fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


# --------------------------------------------------------------------------- terminal


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                      strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
