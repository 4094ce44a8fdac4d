"""Held-out accuracy of the demo model's INT8 quantization stage per calibration subset.

For each seed: 300 class-stratified training digits calibrate the stage twice, with the
retries off (everything quantized) and with the accuracy ladder (the default), and the three
graphs the stage's consumers run (ONNX Runtime INT8, weakly and strongly typed TensorRT) are
scored in ONNX Runtime on the 539 held-out digits. Prints one JSON line per seed and setting:
the largest drop over the exits (FP32 minus INT8, points) per graph and the rung chosen.

    python scripts/int8_subsets.py 0 1 2
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import numpy as np

from edgeperceiver.bundle import Bundle, edit_bundle
from edgeperceiver.data import stratified_subset
from edgeperceiver.datasets.digits import load_digits_split, to_model_input
from edgeperceiver.export import export_checkpoint
from edgeperceiver.models import demo_checkpoint
from edgeperceiver.onnx_utils import load_model
from edgeperceiver.quant_stage import consumer_graphs, ensure_quantized, run_exits
from edgeperceiver.quantize import QuantizeConfig


def main(seeds: list[int]) -> None:
    split = load_digits_split(32)
    work = tempfile.mkdtemp(prefix="ep-int8-")
    demo = f"{work}/demo"
    export_checkpoint(demo_checkpoint(), demo, labels=list(split.classes))
    m = Bundle.open(demo).manifest
    xtr = to_model_input(split.x_train, m.preprocess.mean, m.preprocess.std)
    x, y = to_model_input(split.x_heldout, m.preprocess.mean, m.preprocess.std), split.y_heldout
    exits, name = list(m.exits), m.input.name

    def acc(outs: list[np.ndarray]) -> list[float]:
        return [100 * float(np.mean(o.argmax(1) == y)) for o in outs]

    fp32 = acc(run_exits(load_model(f"{demo}/{m.model_path}"), x, name, exits))
    for seed in seeds:
        calib = xtr[stratified_subset(split.y_train, len(xtr), 300, seed)]
        for label, config in (("all quantized", QuantizeConfig(bias_correction=False, ladder=())),
                              ("ladder", QuantizeConfig(bias_correction=False))):
            root = tempfile.mkdtemp(dir=work) + "/b"
            shutil.copytree(demo, root, symlinks=False)
            with edit_bundle(root) as w:
                stage = ensure_quantized(w, calib, config)
                graphs = consumer_graphs(load_model(f"{w.dir}/{stage.model}"))
            drops = {g: round(max(f - q for f, q in zip(fp32, acc(run_exits(mp, x, name, exits)), strict=True)), 2)
                     for g, mp in zip(("stage", "weak", "strong"), graphs, strict=False)}
            gate = stage.config["gate"]
            print(json.dumps({"seed": seed, "setting": label, "largest_drop": drops, "float_ops": gate["float_ops"],
                              "within_gate_on_calibration": gate["within_gate"]}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2])
