#!/usr/bin/env python3
"""Three ways to run an OpenVINO entry's segments at batch 1, against its monolithic model.

    .venv/bin/python benchmarks/cut_variants_openvino.py BUNDLE [--target openvino-int8]
                                                         [--threads 2] [--rounds 30]

Contenders, timed round-robin in one process (medians; every exit computed, nobody leaves):

- ``monolithic``: the entry's monolithic model, one compiled model;
- ``runner``: the runtime's ``Runner`` with every exit disabled (its zero-copy bound chain);
- ``chain``: the segments' infer requests bound zero-copy, as in the Runner's chain, without
  the Runner around them;
- ``nhwc``: the same, but every carried 4-D map crosses the boundary as NHWC
  (``PrePostProcessor`` transposes at both ends), the layout the CPU plugin's int8
  convolutions use inside a segment;
- ``if``: one compiled model holding the whole chain: after each exit the top-1 softmax is
  compared with a threshold input and an ``If`` node runs the rest of the model or returns
  the exit's logits (thresholds above 1 here, so every ``If`` takes the long branch).

Before timing, the ``if`` model's last exit is checked against the Runner's, and each
early branch is taken once (a threshold of 0) and checked against that exit's logits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_openvino import monolithic  # noqa: E402

from edgeperceiver.bundle import Bundle, SegmentSpec  # noqa: E402
from edgeperceiver.machine import machine_line  # noqa: E402
from edgeperceiver.runtime.runner import load  # noqa: E402
from edgeperceiver.timing import interleaved  # noqa: E402


def carried_after(specs: tuple[SegmentSpec, ...]) -> list[list[str]]:
    """Per segment k: the tensors made up to k that segments after k read."""
    out = []
    for k in range(len(specs)):
        later = specs[k + 1:]
        made_later = {t.name for s in later for t in s.outputs}
        out.append(sorted({t.name for s in later for t in s.inputs} - made_later))
    return out


def if_model(ov: Any, models: list[Any], specs: tuple[SegmentSpec, ...], input_name: str, shape: list[int]) -> Any:
    """The segments joined into one model, exits 1..K-1 guarded by nested ``If`` nodes.

    Inputs: the image and ``thresholds`` (K-1,); outputs: the logits and the 1-based exit.
    """
    import openvino.opset8 as ops
    need = carried_after(specs)
    last = len(models) - 1

    def inline(k: int, avail: dict[str, Any], thr: Any) -> tuple[Any, Any]:
        m = models[k]
        for p in m.get_parameters():
            p.output(0).replace(avail[p.get_friendly_name()])
        for r in m.get_results():
            avail[r.output(0).get_any_name()] = r.input_value(0)
        logits = avail[specs[k].exit]
        exit_no = ops.constant(np.array([k + 1], np.int64)).output(0)
        if k == last:
            return logits, exit_no
        top1 = ops.reduce_max(ops.softmax(logits, 1), np.array([1], np.int64), keep_dims=False)
        t = ops.gather(thr, np.array([k], np.int64), np.array(0, np.int64))
        go_on = ops.squeeze(ops.less(top1, t), np.array([0], np.int64))
        node = ops.if_op(go_on.output(0))
        params = {n: ops.parameter(avail[n].get_partial_shape(), avail[n].get_element_type(), name=n)
                  for n in need[k]}
        body_thr = ops.parameter(thr.get_partial_shape(), thr.get_element_type(), name="thresholds")
        deep_logits, deep_exit = inline(k + 1, {n: p.output(0) for n, p in params.items()}, body_thr.output(0))
        then = ov.Model([ops.result(deep_logits), ops.result(deep_exit)], [*params.values(), body_thr])
        leave_logits = ops.parameter(logits.get_partial_shape(), logits.get_element_type(), name="logits")
        other = ov.Model([ops.result(leave_logits), ops.result(exit_no)], [leave_logits])
        node.set_then_body(then)
        node.set_else_body(other)
        for n, p in params.items():
            node.set_input(avail[n], p, None)
        node.set_input(thr, body_thr, None)
        node.set_input(logits, None, leave_logits)
        a, b = then.get_results(), other.get_results()
        return node.set_output(a[0], b[0]), node.set_output(a[1], b[1])

    image = ops.parameter(shape, ov.Type.f32, name=input_name)
    thresholds = ops.parameter([len(models) - 1], ov.Type.f32, name="thresholds")
    logits, exit_no = inline(0, {input_name: image.output(0)}, thresholds.output(0))
    return ov.Model([ops.result(logits), ops.result(exit_no)], [image, thresholds], "exits_as_if")


def nhwc_boundaries(ov: Any, m: Any, first: bool, exit_name: str) -> Any:
    """``m`` with its carried 4-D inputs (unless ``first``) and outputs laid out NHWC outside."""
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(m)
    for p in () if first else m.get_parameters():
        if len(p.get_partial_shape()) == 4:
            ppp.input(p.get_friendly_name()).tensor().set_layout(ov.Layout("NHWC"))
            ppp.input(p.get_friendly_name()).model().set_layout(ov.Layout("NCHW"))
    for o in m.outputs:
        if o.get_any_name() != exit_name and len(o.get_partial_shape()) == 4:
            ppp.output(o.get_any_name()).model().set_layout(ov.Layout("NCHW"))
            ppp.output(o.get_any_name()).tensor().set_layout(ov.Layout("NHWC"))
    return ppp.build()


def bound_chain(ov: Any, core: Any, models: list[Any], specs: tuple[SegmentSpec, ...], props: dict[str, Any],
                *, nhwc: bool) -> list[Any]:
    """Infer requests of the segments, each input bound zero-copy to the output that makes it."""
    reqs: list[Any] = []
    made: dict[str, Any] = {}
    for k, m in enumerate(models):
        model = nhwc_boundaries(ov, m, k == 0, specs[k].exit) if nhwc else m
        req = core.compile_model(model, "CPU", props).create_infer_request()
        for i in req.model_inputs if k else ():
            req.set_tensor(i, made[i.get_any_name()])
        for o in req.model_outputs:
            made[o.get_any_name()] = req.get_tensor(o)
        reqs.append(req)
    return reqs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--target", default="openvino-int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)

    import openvino as ov

    bundle = Bundle.open(args.bundle)
    man = bundle.manifest
    entry = man.target(args.target)
    specs = man.segments
    n = len(specs)
    shape = [1, *[int(d) for d in man.input.shape[1:]]]
    props = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads,
             "INFERENCE_PRECISION_HINT": str(entry.metadata.get("inference_precision", "f32"))}
    core = ov.Core()

    def models() -> list[Any]:
        out = []
        for p in entry.segments:
            m = core.read_model(str(bundle.path(p)))
            m.reshape({i: [1, *list(i.get_partial_shape())[1:]] for i in m.inputs})
            out.append(m)
        return out

    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    runner = load(args.bundle, args.target, threads=args.threads, thresholds=[None] * n)
    mono = monolithic(args.target, args.threads)(args.bundle)
    fused = core.compile_model(if_model(ov, models(), specs, man.input.name, shape), "CPU", props)
    freq = fused.create_infer_request()
    chains = {"chain": bound_chain(ov, core, models(), specs, props, nhwc=False),
              "nhwc": bound_chain(ov, core, models(), specs, props, nhwc=True)}

    ref = runner.all_exits(x)
    freq.infer({0: x, 1: np.full(n - 1, 2.0, np.float32)})
    got = [(int(freq.get_output_tensor(1).data[0]), freq.get_output_tensor(0).data.copy())]
    for k in range(n - 1):
        th = np.full(n - 1, 2.0, np.float32)
        th[k] = 0.0
        freq.infer({0: x, 1: th})
        got.append((int(freq.get_output_tensor(1).data[0]), freq.get_output_tensor(0).data.copy()))
    for want, (exit_no, logits) in zip([n, *range(1, n)], got, strict=True):
        scale = max(1.0, float(np.abs(ref[want - 1]).max()))
        diff = float(np.abs(logits - ref[want - 1]).max()) / scale
        print(f"if model: exit {exit_no} (want {want}), max |logit diff| / scale {diff:.2e}")
        assert exit_no == want

    never = np.full(n - 1, 2.0, np.float32)

    def run(chain: list[Any]) -> Callable[[], object]:
        image = chain[0].get_input_tensor(0)

        def f() -> None:
            image.data[...] = x
            for q in chain:
                q.start_async()
                q.wait()
        return f

    jobs: dict[str, Callable[[], object]] = {
        "monolithic": lambda: mono(x),
        "runner": lambda: runner.predict(x),
        **{k: run(c) for k, c in chains.items()},
        "if": lambda: freq.infer({0: x, 1: never}, share_outputs=True),
    }
    t = interleaved(jobs, repeats=args.rounds, block=5, settle=1, min_seconds=1.0)
    ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    print(machine_line())
    print(f"{args.target}, batch 1, {args.threads} threads, {args.rounds} rounds, medians:")
    print("| contender | ms | / monolithic |\n|---|---:|---:|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ms['monolithic']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
