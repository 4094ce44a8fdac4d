"""The ``edgeperceiver`` command line: each command parses options and calls the library.

Errors of the :class:`~edgeperceiver.errors.EdgePerceiverError` family are mapped to exit
codes in one place (:func:`main`); heavy libraries are imported only by the command that
needs them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeperceiver.errors import EdgePerceiverError, InputError
from edgeperceiver.types import Criterion, Precision, TargetName

app = typer.Typer(
    name="edgeperceiver",
    help="Ship early-exit image classifiers (Dynamic Perceiver) to CPUs (OpenVINO) and GPUs (TensorRT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BundleArg = Annotated[Path, typer.Argument(help="Bundle directory (made by 'edgeperceiver export').")]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target", "-t", help="Target entry, e.g. 'openvino' or 'openvino-int8' (default: onnxruntime-fp32)."
    ),
]


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=1))


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="Show one model's summary (params, FLOPs per exit).")] = None,
    input_size: Annotated[int | None, typer.Option(help="Input size for the FLOPs count.")] = None,
) -> None:
    """List the model zoo, or summarise one model."""
    from edgeperceiver.models import list_models
    from edgeperceiver.summary import summarize

    if name is None:
        for n in list_models():
            typer.echo(n)
        return
    typer.echo(summarize(name, input_size=input_size))


@app.command()
def export(
    source: Annotated[
        Path | None, typer.Argument(help="Official checkpoint (.pth) or multi-exit ONNX model (.onnx).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")] = Path("bundle"),
    arch: Annotated[str | None, typer.Option(help="Architecture name when the checkpoint has no 'args'.")] = None,
    module: Annotated[
        str | None, typer.Option(help="'package.module:factory' returning an nn.Module with exit logits in order.")
    ] = None,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W for --module.")] = None,
    onnx_exits: Annotated[str | None, typer.Option(help="ONNX output names of the exits, in order.")] = None,
    exits: Annotated[str | None, typer.Option(help="Keep a subset of exits, 1-based, e.g. 1,2,4.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Class names, one per line.")] = None,
    simplify: Annotated[bool, typer.Option(help="Simplify the ONNX graph (verified like the rest).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17 for LayerNormalization).")] = 17,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
) -> None:
    """Export a multi-exit model to a bundle: ONNX, cut into one segment per exit, verified."""
    from edgeperceiver import export as ex

    keep = _ints(exits, "--exits")
    if module is not None:
        shape = _ints(input_shape, "--input-shape")
        if shape is None or len(shape) != 3:
            raise InputError("--module needs --input-shape C,H,W")
        report = ex.export_module(
            ex.load_module_factory(module)(), (shape[0], shape[1], shape[2]), out,
            exits=keep, labels=labels, simplify=simplify, opset=opset, overwrite=force,
        )  # fmt: skip
    elif source is None:
        raise InputError("give a checkpoint or ONNX file to export, or --module package.module:factory")
    elif source.suffix.lower() == ".onnx":
        if not onnx_exits:
            raise InputError("exporting an ONNX model needs --onnx-exits name1,name2,... (the exit outputs, in order)")
        report = ex.export_onnx(
            source, out, exits=onnx_exits.split(","),
            keep=keep, labels=labels, simplify=simplify, opset=opset, overwrite=force,
        )  # fmt: skip
    else:
        report = ex.export_checkpoint(
            source, out, arch=arch, exits=keep, labels=labels, simplify=simplify, opset=opset, overwrite=force
        )
    typer.echo(report.render())
    typer.echo(f"bundle written to {out}")


@app.command(name="compile")
def compile_(
    bundle: BundleArg,
    target: Annotated[TargetName, typer.Option("--target", "-t", help="Backend to compile for.")],
    precision: Annotated[
        Precision, typer.Option("--precision", "-p", help="Precision that will run.")
    ] = Precision.FP32,
    calib_data: Annotated[
        Path | None, typer.Option(help="INT8 calibration images: ImageFolder/image dir or .npz with x.")
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="How many calibration images to use.")] = 300,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-O", help="Backend option KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Quantize (INT8) and compile every segment for a target; atomic."""
    from edgeperceiver.targets import compile_bundle

    opts: dict[str, str] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key] = value
    entry = compile_bundle(bundle, target, precision, calib_data=calib_data, calib_samples=calib_samples, options=opts)
    report = entry.metadata.get("report")
    if report:
        typer.echo(report)
    typer.echo(f"compiled {entry.key} into {bundle}")


@app.command()
def calibrate(
    bundle: BundleArg,
    data: Annotated[Path | None, typer.Option(help="Held-out data: ImageFolder dir or .npz (x, y).")] = None,
    target: TargetOpt = None,
    max_drop: Annotated[float | None, typer.Option(help="Accuracy drop vs last exit, in points.")] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Mean latency budget, ms per sample.")] = None,
    budget_gflops: Annotated[float | None, typer.Option(help="Mean cost budget, GFLOPs per sample.")] = None,
    risk: Annotated[float | None, typer.Option(help="Max disagreement with the last exit (risk control).")] = None,
    delta: Annotated[float, typer.Option(help="Failure probability for --risk.")] = 0.1,
    paper_mix: Annotated[str | None, typer.Option(help="The paper's protocol: exit proportions p1,..,pK.")] = None,
    set_: Annotated[
        str | None, typer.Option("--set", help="Set thresholds by hand, e.g. 0.9,off,1.1,0 ('off' disables an exit).")
    ] = None,
    criterion: Annotated[Criterion, typer.Option(help="Exit confidence score.")] = Criterion.MAX_SOFTMAX,
    exits: Annotated[str | None, typer.Option(help="Exits that may fire, 1-based (others off).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fit/check split.")] = 0,
    latency: Annotated[
        str, typer.Option(help="Exit costs: 'entry' (measured at compile, else FLOPs) or 'bench' (measure now).")
    ] = "entry",
) -> None:
    """Choose per-exit thresholds for a goal on held-out data, measured on the compiled target."""
    import edgeperceiver.calibration as cal

    if set_ is not None:
        typer.echo(cal.set_thresholds(bundle, set_, target=target, criterion=criterion).render())
        return
    if data is None:
        raise InputError("calibrate needs --data HELD_OUT (or --set to set thresholds by hand)")
    goals = {
        "--max-drop": max_drop is not None,
        "--budget-ms": budget_ms is not None,
        "--budget-gflops": budget_gflops is not None,
        "--risk": risk is not None,
        "--paper-mix": paper_mix is not None,
    }
    chosen = [k for k, v in goals.items() if v]
    if len(chosen) > 1:
        raise InputError(f"choose one goal, got {', '.join(chosen)}")
    if max_drop is not None or not chosen:
        goal: cal.Goal = cal.MaxDrop(0.5 if max_drop is None else max_drop)
    elif budget_ms is not None:
        goal = cal.Budget(ms=budget_ms)
    elif budget_gflops is not None:
        goal = cal.Budget(gflops=budget_gflops)
    elif risk is not None:
        goal = cal.Risk(risk, delta)
    else:
        mix = _floats(paper_mix, "--paper-mix")
        assert mix is not None
        goal = cal.PaperMix(mix)
    result = cal.calibrate(
        bundle, data, target=target, goal=goal, criterion=criterion, exits=_ints(exits, "--exits"), seed=seed,
        latency=latency, progress=cal.TextProgress(),
    )  # fmt: skip
    typer.echo(result.render())


@app.command()
def run(
    bundle: BundleArg,
    inputs: Annotated[list[Path], typer.Argument(help="Images, image directories, .npy or .npz files.")],
    target: TargetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 16,
    thresholds: Annotated[str | None, typer.Option(help="Override thresholds, e.g. 0.9,off,0.7,0.")] = None,
) -> None:
    """Classify images with early exit; prints file, label, class, exit and confidence."""
    from edgeperceiver.runtime import load
    from edgeperceiver.runtime.cli_support import render_rows, run_inputs
    from edgeperceiver.runtime.criteria import parse_thresholds

    runner = load(bundle, target)
    th = None if thresholds is None else parse_thresholds(thresholds)
    rows = run_inputs(runner, inputs, batch_size=batch_size, thresholds=th)
    typer.echo(render_rows(rows, as_json=as_json))


@app.command()
def bench(
    bundle: BundleArg,
    target: TargetOpt = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time.")] = "1,8",
    exit_mix: Annotated[
        str | None, typer.Option(help="Force exits in these proportions, e.g. 0.5,0.3,0.1,0.1.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Inputs for latency under the bundle's thresholds.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per measurement.")] = 30,
    block: Annotated[
        int, typer.Option(min=1, help="Timed calls in a row per measurement (1: round-robin single calls, cold).")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Measure per-segment, per-exit, monolithic and early-exit latency on a target."""
    from functools import partial

    from edgeperceiver.bench import bench as run_bench
    from edgeperceiver.progress import TextProgress

    sizes = _ints(batch_sizes, "--batch-sizes") or (1,)
    report = run_bench(
        bundle, target, batch_sizes=sizes, exit_mix=_floats(exit_mix, "--exit-mix"), data=data, repeats=repeats,
        block=block, progress=partial(TextProgress(), "timing (interleaved)"),
    )  # fmt: skip
    typer.echo(report.to_json() if as_json else report.render())


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working directory for the demo's files.")] = Path(
        "demo-out"
    ),
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Engine threads for every latency (default: 1, fastest here).")
    ] = 1,
) -> None:
    """Run the whole toolchain on a Dyn-Perceiver trained on scikit-learn's digits."""
    from edgeperceiver.apps.demo import run_demo

    run_demo(out, echo=typer.echo, threads=threads)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app and map the error family to exit codes, in one place."""
    try:
        app(args=argv)
    except EdgePerceiverError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
