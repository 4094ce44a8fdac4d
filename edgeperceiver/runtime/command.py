"""``python bundle/run.py INPUTS... [--entry E] [--json]``: the standalone runtime's command.

With no ``--entry`` it runs the entry calibrated last (else compiled last) and says so on
stderr. Standard library + numpy + one backend: no Typer, no edgeperceiver installation needed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ..bundle import Bundle
from ..errors import EdgePerceiverError
from .cli_support import dumps_json, render_rows, run_document, run_inputs
from .criteria import parse_thresholds
from .entries import choose_entry
from .runner import DEFAULT_BATCH_SIZE, load


def _parser(with_bundle: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py" if not with_bundle else "python -m edgeperceiver.runtime",
        description="Classify images (files, directories) or .npy/.npz arrays with early exit.",
    )
    if with_bundle:
        p.add_argument("bundle", help="bundle directory")
    p.add_argument("inputs", nargs="+", help="image files, image directories, .npy or .npz files")
    p.add_argument(
        "--entry",
        "-e",
        default=None,
        help="compiled entry, e.g. openvino-int8 (default: the entry calibrated last, else compiled last)",
    )
    p.add_argument("--target", "-t", dest="entry", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="samples per batch")
    p.add_argument("--threads", type=int, default=None, help="backend threads (default: the backend's)")
    p.add_argument("--thresholds", default=None, help="override thresholds, e.g. 0.9,0.8,none,0")
    return p


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, *, bundle: str | None = None) -> int:
    """Parse ``argv``, classify, print; return the exit code (errors -> their family's code).
    The runtime's warnings print as ``warning: ...`` lines."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv, bundle)


def _main(argv: Sequence[str] | None, bundle: str | None) -> int:
    args = _parser(bundle is None).parse_args(None if argv is None else list(argv))
    try:
        b = Bundle.open(bundle if bundle is not None else args.bundle)
        choice = choose_entry(b.manifest, args.entry)
        if not args.json:
            print(f"running {choice.describe()}", file=sys.stderr)
            if choice.warning is not None and args.thresholds is None:
                print(f"warning: {choice.warning}", file=sys.stderr)
        runner = load(b, choice.key, threads=args.threads, batch_size=args.batch_size)
        th = None if args.thresholds is None else parse_thresholds(args.thresholds)
        rows = run_inputs(runner, args.inputs, thresholds=th)
    except EdgePerceiverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        doc = run_document(rows, choice, runner.num_exits)
        if th is not None:
            doc.update(thresholds=list(th), goal="override", warning=None)
        print(dumps_json(doc))
    else:
        print(render_rows(rows))
    return 0
