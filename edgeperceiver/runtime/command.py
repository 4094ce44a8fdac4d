"""``python bundle/run.py INPUTS... [--target T] [--json]``: the standalone runtime's command.

Standard library + numpy + one backend: no Typer, no edgeperceiver installation needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EdgePerceiverError
from .cli_support import render_rows, run_inputs
from .criteria import parse_thresholds
from .runner import DEFAULT_BATCH_SIZE, load


def _parser(with_bundle: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py" if not with_bundle else "python -m edgeperceiver.runtime",
        description="Classify images (files, directories) or .npy/.npz arrays with early exit.",
    )
    if with_bundle:
        p.add_argument("bundle", help="bundle directory")
    p.add_argument("inputs", nargs="+", help="image files, image directories, .npy or .npz files")
    p.add_argument("--target", "-t", default=None, help="target entry, e.g. onnxruntime-fp32 (default)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="samples per batch")
    p.add_argument("--threads", type=int, default=None, help="backend threads (default: the backend's)")
    p.add_argument("--thresholds", default=None, help="override thresholds, e.g. 0.9,0.8,none,0")
    return p


def main(argv: Sequence[str] | None = None, *, bundle: str | None = None) -> int:
    """Parse ``argv``, classify, print; return the exit code (errors -> their family's code)."""
    args = _parser(bundle is None).parse_args(None if argv is None else list(argv))
    try:
        runner = load(bundle if bundle is not None else args.bundle, args.target, threads=args.threads,
                      batch_size=args.batch_size)
        th = None if args.thresholds is None else parse_thresholds(args.thresholds)
        rows = run_inputs(runner, args.inputs, thresholds=th)
    except EdgePerceiverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render_rows(rows, as_json=args.json))
    return 0
