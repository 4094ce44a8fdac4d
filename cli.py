"""The ``edgeperceiver`` command line: each command parses options and calls the library.

Errors of the :class:`~edgeperceiver.errors.EdgePerceiverError` family are mapped to exit
codes in one place (:func:`main`); heavy libraries are imported only by the command that
needs them.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from edgeperceiver.errors import EdgePerceiverError, InputError
from edgeperceiver.types import Criterion, Precision, TargetName

if TYPE_CHECKING:
    from edgeperceiver.bundle import Bundle
    from edgeperceiver.runtime.entries import EntryChoice

app = typer.Typer(
    name="edgeperceiver",
    help="Ship early-exit image classifiers (Dynamic Perceiver) to CPUs (OpenVINO) and GPUs (TensorRT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BundleArg = Annotated[Path, typer.Argument(help="Bundle directory (made by 'edgeperceiver export').")]
EntryOpt = Annotated[
    str | None,
    typer.Option(
        "--entry", "-e",
        help="Compiled entry '<target>-<precision>', e.g. openvino-int8 (default: the entry calibrated last, "
        "else compiled last).",
    ),
]  # fmt: skip
TargetOpt = EntryOpt  # the name older commands use
#: the old spelling of --entry, still accepted
OldTargetOpt = Annotated[str | None, typer.Option("--target", "-t", hidden=True)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts); no progress bars.")]


class LatencySource(str, Enum):
    """Where calibrate takes the exit costs from."""

    ENTRY = "entry"  #: measured at compile time, else FLOPs
    BENCH = "bench"  #: measured now


def _entry_name(entry: str | None, old: str | None) -> str | None:
    if entry is not None and old is not None and entry != old:
        raise InputError(f"--entry {entry} and --target {old} name different entries; give one")
    return entry if entry is not None else old


def _choose_entry(bundle: Path, name: str | None, *, quiet: bool, doing: str = "running") -> tuple[Bundle, EntryChoice]:
    """Open ``bundle`` and choose the entry to use; say which on stderr (unless ``quiet``)."""
    from edgeperceiver.bundle import Bundle
    from edgeperceiver.runtime.entries import choose_entry

    b = Bundle.open(bundle)
    choice = choose_entry(b.manifest, name)
    if not quiet:
        typer.echo(f"{doing} {choice.describe()}", err=True)
        if choice.warning is not None:
            typer.secho(f"warning: {choice.warning}", err=True, fg=typer.colors.YELLOW)
    return b, choice


N = TypeVar("N", int, float)


def _numbers(text: str | None, what: str, kind: type[N]) -> tuple[N, ...] | None:
    """A comma-separated option value as numbers of ``kind`` (int or float); None stays None."""
    if text is None:
        return None
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise InputError(f"{what}: expected comma-separated {noun}, got {text!r}") from None


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    return _numbers(text, what, float)


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    return _numbers(text, what, int)


def _echo_json(obj: Any) -> None:
    """Print ``obj`` as one strict JSON document (non-finite floats become null)."""
    from edgeperceiver.runtime.cli_support import dumps_json

    typer.echo(dumps_json(obj))


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="Show one model's summary (params, FLOPs per exit).")] = None,
    input_size: Annotated[int | None, typer.Option(help="Input size for the FLOPs count.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the model zoo, or summarise one model."""
    from edgeperceiver.models import list_models
    from edgeperceiver.summary import model_summary, summarize

    if name is None:
        names = list(list_models())
        if as_json:
            _echo_json({"models": names})
        else:
            for n in names:
                typer.echo(n)
        return
    if as_json:
        _echo_json(model_summary(name, input_size=input_size))
    else:
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
    exits: Annotated[
        str | None, typer.Option(help="Exits samples may leave at, 1-based, e.g. 1,2,4 (export drops the others).")
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="Class names, one per line.")] = None,
    simplify: Annotated[bool, typer.Option(help="Simplify the ONNX graph (verified like the rest).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17 for LayerNormalization).")] = 17,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a multi-exit model to a bundle: ONNX, cut into one segment per exit, verified."""
    from edgeperceiver import export as ex
    from edgeperceiver.apps.progress_bar import status, stdout_to_stderr
    from edgeperceiver.progress import messages_to

    keep = _ints(exits, "--exits")
    with (
        status(f"exporting {out}", enabled=not as_json) as show,
        messages_to(show),
        stdout_to_stderr(),
    ):
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
                raise InputError(
                    "exporting an ONNX model needs --onnx-exits name1,name2,... (the exit outputs, in order)"
                )
            report = ex.export_onnx(
                source, out, exits=onnx_exits.split(","),
                keep=keep, labels=labels, simplify=simplify, opset=opset, overwrite=force,
            )  # fmt: skip
        else:
            report = ex.export_checkpoint(
                source, out, arch=arch, exits=keep, labels=labels, simplify=simplify, opset=opset, overwrite=force
            )
    if as_json:
        _echo_json({"bundle": str(out), "report": report})
        return
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
    check: Annotated[
        bool, typer.Option("--check", help="Run every step before the engine build, without the engine "
                           "library (tensorrt); exit 0 when ready, 1 with the reasons.")
    ] = False,
    dla_core: Annotated[
        int | None, typer.Option("--dla-core", help="TensorRT on Jetson: build for this DLA core (GPU fallback).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantize (INT8) and compile every segment for a target; atomic."""
    from edgeperceiver.apps.progress_bar import status, stdout_to_stderr
    from edgeperceiver.progress import messages_to
    from edgeperceiver.targets import compile_bundle

    opts: dict[str, str] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key] = value
    if dla_core is not None:
        opts["dla_core"] = str(dla_core)
    if check:
        from edgeperceiver.targets import check_bundle

        result = check_bundle(bundle, target, precision, calib_data=calib_data, calib_samples=calib_samples,
                              options=opts)
        if as_json:
            _echo_json({"bundle": str(bundle), "ready": result.ready, "lines": result.lines,
                        "problems": result.problems})
        else:
            typer.echo(result.render())
        raise typer.Exit(0 if result.ready else 1)
    with (
        status(f"compiling {target.value}-{precision.value}", enabled=not as_json) as show,
        messages_to(show),
        stdout_to_stderr(),
    ):
        entry = compile_bundle(
            bundle, target, precision, calib_data=calib_data, calib_samples=calib_samples, options=opts
        )
    if as_json:
        _echo_json({"bundle": str(bundle), "entry": entry.key, "segments": entry.segments,
                    "latency_ms": entry.latency_ms, "metadata": entry.metadata})  # fmt: skip
        return
    report = entry.metadata.get("report")
    if report:
        typer.echo(report)
    typer.echo(f"compiled {entry.key} into {bundle}")


@app.command()
def calibrate(
    bundle: BundleArg,
    data: Annotated[Path | None, typer.Option(help="Held-out data: ImageFolder dir or .npz (x, y).")] = None,
    entry: Annotated[
        str | None,
        typer.Option("--entry", "-e", help="Compiled entry to calibrate, e.g. openvino-int8 (default: compiled last)."),
    ] = None,
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
    exits: Annotated[
        str | None, typer.Option(help="Exits samples may leave at, 1-based, e.g. 1,2,4 (the others are off).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fit/check split.")] = 0,
    latency: Annotated[
        LatencySource,
        typer.Option(help="Exit costs: 'entry' (measured at compile, else FLOPs) or 'bench' (measure now)."),
    ] = LatencySource.ENTRY,
    as_json: JsonOpt = False,
    old_target: OldTargetOpt = None,
) -> None:
    """Choose per-exit thresholds for a goal on held-out data, measured on the compiled target."""
    import edgeperceiver.calibration as cal
    from edgeperceiver.apps.progress_bar import progress_bars, stdout_to_stderr
    from edgeperceiver.bundle import Bundle
    from edgeperceiver.runtime.entries import last_compiled

    name = _entry_name(entry, old_target)
    if name is None:
        name = last_compiled(Bundle.open(bundle).manifest).key
        if not as_json:
            typer.echo(f"calibrating entry {name} (compiled last)", err=True)
    if set_ is not None:
        with stdout_to_stderr():
            manual = cal.set_thresholds(bundle, set_, target=name, criterion=criterion)
        if as_json:
            _echo_json({"entry": manual.target, "thresholds": manual.thresholds.values,
                        "criterion": manual.thresholds.criterion, "never_fires": manual.never_fires,
                        "last_exit": manual.last_exit})  # fmt: skip
        else:
            typer.echo(manual.render())
        return
    if data is None:
        raise InputError("calibrate needs --data HELD_OUT (or --set to set thresholds by hand)")
    goal = cal.goal_from_options(max_drop=max_drop, budget_ms=budget_ms, budget_gflops=budget_gflops, risk=risk,
                                 delta=delta, paper_mix=_floats(paper_mix, "--paper-mix"))
    with progress_bars(enabled=not as_json) as bars, stdout_to_stderr():
        result = cal.calibrate(
            bundle, data, target=name, goal=goal, criterion=criterion, exits=_ints(exits, "--exits"), seed=seed,
            latency=latency.value, progress=bars,
        )  # fmt: skip
    if as_json:
        _echo_json({"entry": name, "thresholds": result.thresholds.values, **result.summary()})
    else:
        typer.echo(result.render())


@app.command()
def run(
    bundle: BundleArg,
    inputs: Annotated[list[Path], typer.Argument(help="Images, image directories, .npy or .npz files.")],
    entry: EntryOpt = None,
    as_json: JsonOpt = False,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 16,
    thresholds: Annotated[str | None, typer.Option(help="Override thresholds, e.g. 0.9,off,0.7,0.")] = None,
    old_target: OldTargetOpt = None,
) -> None:
    """Classify images with early exit; prints file, label, class, exit and confidence."""
    from edgeperceiver.runtime import load
    from edgeperceiver.runtime.cli_support import render_rows, run_document, run_inputs
    from edgeperceiver.runtime.criteria import parse_thresholds

    th = None if thresholds is None else parse_thresholds(thresholds)
    from edgeperceiver.apps.progress_bar import stdout_to_stderr

    b, choice = _choose_entry(bundle, _entry_name(entry, old_target), quiet=as_json or th is not None)
    with stdout_to_stderr():
        runner = load(b, choice.key)
        rows = run_inputs(runner, inputs, batch_size=batch_size, thresholds=th)
    if as_json:
        doc = run_document(rows, choice, runner.num_exits)
        if th is not None:
            doc.update(thresholds=list(th), goal="override", warning=None)
        _echo_json(doc)
    else:
        typer.echo(render_rows(rows))


@app.command()
def bench(
    bundle: BundleArg,
    entry: EntryOpt = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time.")] = "1,8",
    exit_mix: Annotated[
        str | None, typer.Option(help="Force exits in these proportions, e.g. 0.5,0.3,0.1,0.1.")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Inputs for latency under the bundle's thresholds.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per measurement.")] = 30,
    block: Annotated[
        int, typer.Option(min=1, help="Timed calls in a row per measurement (1: round-robin single calls, cold).")
    ] = 1,
    as_json: JsonOpt = False,
    old_target: OldTargetOpt = None,
) -> None:
    """Measure per-segment, per-exit, monolithic and early-exit latency on a target."""
    from edgeperceiver.apps.progress_bar import progress_bars, stdout_to_stderr
    from edgeperceiver.bench import bench as run_bench

    sizes = _ints(batch_sizes, "--batch-sizes") or (1,)
    b, choice = _choose_entry(bundle, _entry_name(entry, old_target), quiet=as_json, doing="timing")
    with progress_bars(enabled=not as_json) as bars, stdout_to_stderr():
        report = run_bench(
            b, choice.key, batch_sizes=sizes, exit_mix=_floats(exit_mix, "--exit-mix"), data=data, repeats=repeats,
            block=block, progress=None if bars is None else bars.stage("bench"),
        )  # fmt: skip
    if as_json:
        _echo_json({**choice.to_dict(), "warning": choice.warning, **report.to_dict()})
    else:
        typer.echo(report.render())


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working directory for the demo's files.")] = Path(
        "demo-out"
    ),
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="Engine threads for every latency (default: 1, fastest here).")
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole toolchain on a Dyn-Perceiver trained on scikit-learn's digits."""
    from edgeperceiver.apps.demo import run_demo
    from edgeperceiver.apps.progress_bar import progress_bars, stdout_to_stderr

    with progress_bars(enabled=not as_json) as bars, stdout_to_stderr(as_json):
        report = run_demo(out, echo=(lambda _line: None) if as_json else typer.echo, threads=threads, progress=bars)
    if as_json:
        _echo_json({"out": str(out), "bundle": str(out / "bundle"), **_fields(report)})


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict (for JSON documents)."""
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@app.command()
def serve(
    bundle: BundleArg,
    entry: Annotated[
        str | None, typer.Option("--entry", "-e", help="Entry, e.g. openvino-int8 (default: the runtime's choice).")
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas (each loads the runtime once).")] = 1,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests per batch formed by Ray Serve.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits to fill, ms.")] = 2.0,
    host: Annotated[str, typer.Option(help="HTTP address (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster ('auto': the one 'ray start' made here).")
    ] = None,
    thresholds: Annotated[str | None, typer.Option(help="Override thresholds, e.g. 0.9,off,0.7,0.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Engine threads per replica.")] = 1,
    replica_cpus: Annotated[float, typer.Option(min=0, help="Ray CPUs reserved per replica.")] = 1.0,
    haproxy: Annotated[
        bool, typer.Option(help="HTTP through Ray Serve's HAProxy ingress (a Ray instance started here).")
    ] = True,
) -> None:
    """Serve a bundle over HTTP on Ray Serve: batched requests, per-sample early exit."""
    from edgeperceiver.apps.serve import ServeConfig, serve_bundle
    from edgeperceiver.runtime.criteria import parse_thresholds

    config = ServeConfig.for_bundle(
        bundle, entry=entry, thresholds=None if thresholds is None else parse_thresholds(thresholds),
        replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms, threads=threads,
        replica_cpus=replica_cpus,
    )  # fmt: skip
    serve_bundle(config, address=address, host=host, port=port, haproxy=haproxy, echo=typer.echo)


@app.command()
def pack(
    bundle: BundleArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Archive to write: .tar.gz, .tgz, .tar.xz or .tar.")],
    entry: Annotated[
        list[str] | None, typer.Option("--entry", "-e", help="Keep only this entry (repeatable; default: all).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing archive.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pack a bundle into one archive of plain files for the device (verified; optionally trimmed)."""
    from edgeperceiver.pack import pack_bundle

    report = pack_bundle(bundle, out, entries=entry, overwrite=force)
    if as_json:
        _echo_json({**_fields(report), "archive": str(report.archive)})
        return
    typer.echo(f"wrote {report.archive}: {report.files} files, {report.bytes_in / 1e6:.1f} MB in, "
               f"{report.bytes_out / 1e6:.1f} MB packed; entries: {', '.join(report.entries) or 'none'}")
    typer.echo(f"on the device: tar xf {report.archive.name} && python {report.top}/run.py IMAGES")


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: a bundle being written removes its staging


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app and map the error family to exit codes, in one place.

    The library's warnings (skipped images, no thresholds) print as ``warning: ...`` lines;
    SIGTERM stops a command as Ctrl-C does, so a write in progress cleans up after itself.
    """
    import signal
    import threading
    import warnings

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            app(args=argv)
    except EdgePerceiverError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
