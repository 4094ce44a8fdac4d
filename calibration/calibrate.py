"""``calibrate``: thresholds for a goal, measured on the deployed target, written into the bundle.

Flow: open the bundle, read the held-out data with the bundle's preprocessing, record all
exits once on the target entry (its precision; cached), split the samples into a fitting
and a checking part (seeded, stratified), choose thresholds on the fitting part for the
goal, report every figure on the checking part, and write ``Thresholds`` plus a summary
into the target entry and ``reports/<target-key>/report.csv`` + ``pareto.png`` into the
bundle, atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeperceiver.bundle import Bundle, Manifest, Thresholds, edit_bundle
from edgeperceiver.data import Dataset, load_dataset, split_fit_check
from edgeperceiver.errors import CalibrationError, InputError
from edgeperceiver.progress import StageProgress
from edgeperceiver.runtime.criteria import parse_thresholds
from edgeperceiver.types import Criterion

from .collect import ExitRecord, collect
from .goals import Budget, ExitCosts, Goal, MaxDrop, PaperMix, Risk, exit_costs, monotone
from .paper import mix_thresholds
from .policies import budget, evaluate, max_drop, single_exit
from .report import CurvePoint, build_curve, csv_bytes, pareto_png
from .result import CalibrationResult, ManualThresholds
from .risk import RiskFit, RiskLoss, losses, risk_control

# --------------------------------------------------------------------------- pure part


def _allowed(exits: Sequence[int] | None, k_count: int) -> list[int]:
    if exits is None:
        return list(range(k_count))
    allowed = sorted(set(exits))
    if not allowed:
        raise InputError("exits: name at least one exit")
    bad = [e for e in allowed if not 1 <= e <= k_count]
    if bad:
        raise InputError(f"exits {bad} do not exist: the model has exits 1..{k_count}")
    return [e - 1 for e in allowed]


def _public(values: Sequence[float | None]) -> tuple[float | None, ...]:
    """Never-firing (+inf) exits are written as off (None): a later exit still runs their segments."""
    return tuple(None if v is None or (math.isinf(v) and v > 0) else float(v) for v in values)


#: fewest held-out samples :func:`choose` accepts, and fewest in each of its fit/check parts
MIN_SAMPLES = 20
MIN_PART = 10


def choose(
    record: ExitRecord,
    goal: Goal,
    costs: ExitCosts,
    *,
    criterion: Criterion | str = Criterion.MAX_SOFTMAX,
    exits: Sequence[int] | None = None,
    fit_fraction: float = 0.5,
    seed: int = 0,
    curve: bool = True,
) -> CalibrationResult:
    """Choose thresholds for ``goal`` on recorded exit outputs (no bundle needed)."""
    crit = Criterion(criterion)
    k_count, n = record.num_exits, len(record)
    allowed = _allowed(exits, k_count)
    labels = record.labels
    needs_labels = not (isinstance(goal, Risk) and goal.loss is RiskLoss.DISAGREEMENT)
    if needs_labels and labels is None:
        raise CalibrationError(
            f"goal {goal.describe()} measures accuracy and needs labelled held-out data "
            "(an ImageFolder directory or a .npz with y); unlabeled data works for --risk (disagreement)"
        )
    if len(costs.values) != k_count:
        raise CalibrationError(f"{len(costs.values)} exit costs for {k_count} exits")
    if n < MIN_SAMPLES:
        raise CalibrationError(
            f"{n} held-out samples are too few to choose thresholds: at least {MIN_SAMPLES} are needed "
            f"(half to fit, half to check; on fewer the check says nothing); give more held-out data"
        )
    fit_idx, check_idx = split_fit_check(labels, n, fit_fraction, seed)
    if min(len(fit_idx), len(check_idx)) < MIN_PART:
        raise CalibrationError(
            f"fit_fraction {fit_fraction:g} splits {n} samples into {len(fit_idx)} to fit and {len(check_idx)} "
            f"to check; each part needs at least {MIN_PART}"
        )
    fit, check = record.subset(fit_idx), record.subset(check_idx)
    fs, cs = fit.scores[crit], check.scores[crit]
    notes: list[str] = []
    risk_fit: RiskFit | None = None
    check_risk: float | None = None
    if isinstance(goal, MaxDrop):
        assert fit.labels is not None
        values = max_drop(
            fs, fit.preds, fit.labels, costs.values, goal.points, allowed, z=goal.z, gains=goal.count_gains
        )
    elif isinstance(goal, Budget):
        assert fit.labels is not None
        if (goal.ms is not None) != (costs.unit == "ms"):
            raise CalibrationError(f"budget {goal.describe()} but exit costs are in {costs.unit} ({costs.source})")
        values = budget(fs, fit.preds, fit.labels, costs.values, goal.limit, allowed)
    elif isinstance(goal, Risk):
        risk_fit = risk_control(
            fs, fit.preds, fit.labels, eps=goal.eps, delta=goal.delta, criterion=crit,
            num_classes=record.num_classes, allowed=allowed, loss=goal.loss, bound=goal.bound,
        )
        values = risk_fit.thresholds
        if risk_fit.certified == 0:
            notes.append(
                f"{fit.preds.shape[1]} fitting samples certify nothing at risk {goal.eps:g}, delta {goal.delta:g} "
                f"(need at least {risk_fit.min_samples}): no sample leaves early"
            )
        shared = next((v for k, v in enumerate(values) if k in allowed[:-1] and v is not None), math.inf)
        check_risk = float(losses(cs, check.preds, check.labels, allowed, [shared], goal.loss).mean())
    else:
        assert isinstance(goal, PaperMix)
        props = goal.proportions
        if len(props) == k_count and len(allowed) < k_count:
            off = [k + 1 for k in range(k_count) if k not in allowed and props[k] > 0]
            if off:
                raise InputError(f"paper mix sends samples to exits {off}, which are off")
            props = tuple(props[k] for k in allowed)
        if len(props) != len(allowed):
            raise InputError(f"paper mix has {len(goal.proportions)} proportions for {len(allowed)} enabled exits")
        sub = mix_thresholds(fs[allowed], props)
        v: list[float | None] = [None] * k_count
        for pos, k in enumerate(allowed):
            v[k] = sub[pos] if pos < len(allowed) - 1 else 0.0
        values = tuple(v)
    final_values = single_exit(allowed[-1], k_count)
    fit_point = evaluate(fs, fit.preds, fit.labels, values, costs.values)
    check_point = evaluate(cs, check.preds, check.labels, values, costs.values)
    final_fit = evaluate(fs, fit.preds, fit.labels, final_values, costs.values)
    final_check = evaluate(cs, check.preds, check.labels, final_values, costs.values)
    met: bool | None = None
    if isinstance(goal, MaxDrop):
        assert check_point.accuracy is not None and final_check.accuracy is not None
        met = check_point.accuracy >= final_check.accuracy - goal.points / 100.0 - 1e-12
    elif isinstance(goal, Budget):
        met = check_point.cost <= goal.limit + 1e-12
    elif isinstance(goal, Risk) and check_risk is not None:
        met = check_risk <= goal.eps
    if costs.unit == "segments":
        notes.append("no latency or FLOPs in the bundle: cost counts segments run (run 'edgeperceiver bench')")
    alone: tuple[float | None, ...] = (None,) * k_count
    if check.labels is not None:
        alone = tuple(float(a) for a in (check.preds == check.labels[None, :]).mean(axis=1))
    points: tuple[CurvePoint, ...] = ()
    if curve:
        points = build_curve(fs, fit.preds, fit.labels, cs, check.preds, check.labels, costs, allowed)
    return CalibrationResult(
        target=record.target, goal=goal, criterion=crit,
        thresholds=Thresholds(crit, _public(values), goal.describe()), costs=costs,
        exits=tuple(k + 1 for k in allowed), fit=fit_point, check=check_point, final_fit=final_fit,
        final_check=final_check, met=met, curve=points, exit_alone=alone, risk=risk_fit, check_risk=check_risk,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- bundle-level API


def calibrate(
    bundle: str | os.PathLike[str] | Bundle,
    data: str | os.PathLike[str] | Dataset,
    *,
    target: str | None = None,
    goal: Goal | None = None,
    criterion: Criterion | str = Criterion.MAX_SOFTMAX,
    exits: Sequence[int] | None = None,
    fit_fraction: float = 0.5,
    seed: int = 0,
    progress: StageProgress | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    cache: bool = True,
    write: bool = True,
    latency: str = "entry",
    bench_repeats: int = 20,
    bench_threads: int | None = None,
    bench_clock: str = "wall",
) -> CalibrationResult:
    """Calibrate ``target``'s thresholds for ``goal`` (default ``MaxDrop(0.5)``) on held-out ``data``.

    ``data`` is an ImageFolder/image directory, a ``.npz`` (x, y) or a :class:`Dataset`;
    ``exits`` (1-based) limits which exits may fire. With ``write`` the thresholds, a summary
    and the report files go into the bundle (atomically). ``latency="entry"`` takes the cost
    per exit from the target entry (``latency_ms``, else FLOPs); ``"bench"`` measures it now,
    batch 1 through the runtime (:func:`edgeperceiver.bench.bench`, ``bench_repeats`` medians),
    which includes the runtime's own per-call work (``bench_threads``: the engine's threads then,
    default the runtime's; ``bench_clock="cpu"``: process CPU time, for machines shared with others).
    """
    if latency not in ("entry", "bench"):
        raise InputError(f"latency must be 'entry' or 'bench', got {latency!r}")
    goal = MaxDrop(0.5) if goal is None else goal
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    manifest = b.manifest
    entry = manifest.target(target)
    if isinstance(data, Dataset):
        dataset = data
    else:
        read = None if progress is None else (lambda d, t: progress("read", d, t))
        dataset = load_dataset(data, manifest.preprocess, limit=limit, seed=seed, progress=read)
    if dataset.y is not None and dataset.y.size and int(dataset.y.max()) >= manifest.num_classes:
        raise CalibrationError(
            f"held-out labels go up to {int(dataset.y.max())} but the model has {manifest.num_classes} classes"
        )
    if manifest.classes and dataset.classes and tuple(dataset.classes) != tuple(manifest.classes):
        raise CalibrationError(
            f"held-out classes {list(dataset.classes)[:5]}... do not match the bundle's classes "
            f"{list(manifest.classes)[:5]}... (label i must mean the model's class i)"
        )
    run = None if progress is None else (lambda d, t: progress("run", d, t))
    record = collect(b, dataset, target=entry.key, batch_size=batch_size, cache=cache, progress=run)
    unit = None
    if isinstance(goal, Budget):
        unit = "ms" if goal.ms is not None else "GFLOPs"
    if latency == "bench" and unit != "GFLOPs":
        costs = measured_costs(b, entry.key, repeats=bench_repeats, threads=bench_threads, clock=bench_clock)
    else:
        costs = exit_costs(manifest, entry, unit=unit)
    result = choose(record, goal, costs, criterion=criterion, exits=exits, fit_fraction=fit_fraction, seed=seed)
    notes = result.notes
    if dataset.skipped:
        notes = (*notes, f"{len(dataset.skipped)} unreadable images skipped, e.g. {dataset.skipped[0]}")
    result = _replace(result, skipped=len(dataset.skipped), notes=notes)
    if not write:
        return result
    return _write(b.root, entry.key, result, basis=b.manifest)


def measured_costs(
    bundle: Bundle, target: str, *, repeats: int = 20, threads: int | None = None, clock: str = "wall"
) -> ExitCosts:
    """Cumulative batch-1 latency to each exit through the runtime, measured now by ``bench``."""
    from edgeperceiver.bench import bench

    report = bench(bundle, target, batch_sizes=(1,), repeats=repeats, warmup=2, threads=threads, clock=clock)
    cum = tuple(float(v) for v in report.batch(1).cumulative_ms)
    what = f"latency through the runtime on {target}, batch 1 (bench, median of {repeats}, {clock} clock)"
    return monotone(ExitCosts(cum, "ms", what))


def _replace(result: CalibrationResult, **changes: Any) -> CalibrationResult:
    import dataclasses

    return dataclasses.replace(result, **changes)


def _artifacts(manifest: Manifest, key: str) -> tuple[str | None, ...]:
    """The sha256 of every artifact of entry ``key``: what the thresholds were measured on."""
    entry = manifest.target(key)
    return tuple(manifest.files.get(rel) for rel in (*entry.segments, entry.monolithic or ""))


def _write(root: Path, key: str, result: CalibrationResult, *, basis: Manifest | None = None) -> CalibrationResult:
    import dataclasses

    folder = f"reports/{key}"
    files = (f"{folder}/report.csv", f"{folder}/pareto.png")
    result = _replace(result, report_files=files)
    title = f"{key}: {result.goal.describe()} ({result.criterion.value})"
    csv_data = csv_bytes(result.curve, result.fit, result.check, result.goal.describe(), result.costs)
    hline = vline = None
    goal = result.goal
    if isinstance(goal, MaxDrop) and result.final_check.accuracy is not None:
        hline = (100 * result.final_check.accuracy - goal.points, f"final exit - {goal.points:g} pts")
    elif isinstance(goal, Budget):
        vline = (goal.limit, f"budget {goal.limit:g} {result.costs.unit}")
    elif isinstance(goal, Risk) and goal.loss is RiskLoss.DISAGREEMENT and result.final_check.accuracy is None:
        hline = (100 * (1 - goal.eps), f"agreement {100 * (1 - goal.eps):g}%")
    png = pareto_png(result.curve, result.check, result.costs, title, hline=hline, vline=vline)
    with edit_bundle(root) as writer:
        assert writer.manifest is not None
        if basis is not None and _artifacts(writer.manifest, key) != _artifacts(basis, key):
            raise CalibrationError(
                f"{key} was compiled again while it was being calibrated (another process); its thresholds "
                "would not fit the new artifacts, so none were written: run calibrate again"
            )
        writer.replace_file(files[0], csv_data)
        writer.replace_file(files[1], png)
        entry = writer.manifest.target(key)
        new = dataclasses.replace(entry, thresholds=result.thresholds, calibration=result.summary())
        writer.manifest = writer.manifest.with_target(new)
    return result


def set_thresholds(
    bundle: str | os.PathLike[str] | Bundle,
    values: Sequence[float | None] | str,
    *,
    target: str | None = None,
    criterion: Criterion | str = Criterion.MAX_SOFTMAX,
) -> ManualThresholds:
    """Write thresholds by hand: one value per exit, ``None`` (or "off") turns an exit off.

    A value no score can reach (> 1 for max-softmax or margin, > 0 for entropy) keeps the
    exit on but it never fires; the last enabled exit takes every remaining sample.
    """
    import dataclasses

    crit = Criterion(criterion)
    vals = parse_thresholds(values) if isinstance(values, str) else tuple(
        None if v is None else float(v) for v in values
    )
    root = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
    manifest = Bundle.open(root).manifest
    entry = manifest.target(target)
    k_count = len(manifest.segments)
    if len(vals) != k_count:
        raise InputError(f"got {len(vals)} thresholds for a model with {k_count} exits")
    if any(v is not None and (math.isnan(v)) for v in vals):
        raise InputError(f"thresholds contain NaN: {vals}")
    enabled = [k for k, v in enumerate(vals) if v is not None]
    if not enabled:
        raise InputError("every exit is off: at least one exit must stay on")
    top = 0.0 if crit is Criterion.ENTROPY else 1.0
    never = tuple(k + 1 for k in enabled[:-1] if vals[k] is not None and vals[k] > top)  # type: ignore[operator]
    th = Thresholds(crit, vals, "manual")
    with edit_bundle(root) as writer:
        assert writer.manifest is not None
        current = writer.manifest.target(entry.key)
        new = dataclasses.replace(current, thresholds=th, calibration={"goal": "manual", "criterion": crit.value})
        writer.manifest = writer.manifest.with_target(new)
    return ManualThresholds(entry.key, th, never, enabled[-1] + 1)
