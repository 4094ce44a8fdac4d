#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, TensorRT and pycuda (a Jetson or an x86 workstation):
# builds fp32/fp16/int8 engines for the demo model and the golden fixtures, checks their exits
# against ONNX Runtime, runs the GPU tests, times the segments, and prints a verified / not verified
# table. Nothing here is needed on a machine without a GPU.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu-check; PYTHON=... to pick the interpreter)
#
# The golden fixtures are read from $GOLDEN (default: ../shared/fixtures/dynperceiver); missing
# fixtures are reported as not verified, not as failures.
set -u
OUT=${1:-gpu-check}
PY=${PYTHON:-python}
GOLDEN=${GOLDEN:-$(cd "$(dirname "$0")/.." && pwd)/../shared/fixtures/dynperceiver}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$SUMMARY"; }

echo "== environment" | tee "$OUT/env.txt"
if ! $PY - >> "$OUT/env.txt" 2>&1 <<'PY'
import platform
import tensorrt
import pycuda.driver as cuda
from edgeperceiver.runtime.tensorrt_device import host_platform, jetpack_of, jetson_module, strongly_typed_default
cuda.init()
dev = cuda.Device(0)
plat = host_platform()
print(f"TensorRT {tensorrt.__version__}; typing {'strong' if strongly_typed_default(tensorrt.__version__) else 'weak'}")
print(f"GPU {dev.name()} sm {'.'.join(map(str, dev.compute_capability()))}; CUDA driver {cuda.get_driver_version()}")
print(f"platform {plat} (JetPack {jetpack_of(plat)}) module {jetson_module() or '-'}; python {platform.python_version()}")
PY
then
    cat "$OUT/env.txt"
    echo "TensorRT/pycuda/GPU not usable here: nothing can be verified (see $OUT/env.txt)"
    exit 2
fi
cat "$OUT/env.txt"

echo "== GPU tests"
if $PY -m pytest -q -p no:cacheprovider tests/test_tensorrt_gpu.py -rs > "$OUT/gpu_tests.log" 2>&1; then
    record "tests/test_tensorrt_gpu.py" "verified" "$(tail -1 "$OUT/gpu_tests.log")"
else
    record "tests/test_tensorrt_gpu.py" "FAILED" "$(tail -1 "$OUT/gpu_tests.log")"
fi

echo "== models"
$PY - "$OUT" "$GOLDEN" "$SUMMARY" <<'PY'
import sys, time, traceback
from pathlib import Path
import numpy as np

out, golden, summary = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def record(what, status, detail):
    with open(summary, "a") as f:
        f.write(f"{what}\t{status}\t{detail}\n")
    print(f"{status:14s} {what}: {detail}", flush=True)

from edgeperceiver.bench import bench
from edgeperceiver.runtime import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Precision, TargetName

def models():
    from edgeperceiver.datasets.digits import load_digits_split, to_model_input
    from edgeperceiver.export import export_checkpoint
    from edgeperceiver.models import demo_checkpoint
    split = load_digits_split(32)
    root = out / "demo"
    export_checkpoint(demo_checkpoint(), root, labels=list(split.classes), overwrite=True)
    from edgeperceiver.bundle import Bundle
    pre = Bundle.open(root).manifest.preprocess
    yield "demo", root, to_model_input(split.x_train, pre.mean, pre.std)[:300], \
        to_model_input(split.x_heldout, pre.mean, pre.std), split.y_heldout
    for pth in sorted(golden.glob("*.pth")):
        name = pth.name.split(".")[0]
        root = out / name
        try:
            export_checkpoint(pth, root, overwrite=True)
        except Exception as exc:
            record(f"{name} export", "FAILED", str(exc)[:200])
            continue
        x = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
        yield name, root, x, x[:8], None

if not golden.is_dir():
    record("golden fixtures", "not verified", f"{golden} not found")

for name, root, calib, x, y in models():
    ref = load(root, "onnxruntime-fp32").all_exits(x)
    for precision in (Precision.FP32, Precision.FP16, Precision.INT8):
        key = f"tensorrt-{precision.value}"
        try:
            t0 = time.perf_counter()
            compile_bundle(root, TargetName.TENSORRT, precision, calib_data=calib if precision is Precision.INT8
                           else None, options={"max_batch": 8})
            built = time.perf_counter() - t0
            with load(root, key, batch_size=32) as runner:
                got = runner.all_exits(x)
            diffs = [float(np.abs(g - r).max() / max(1.0, float(np.abs(r).max()))) for g, r in zip(got, ref)]
            detail = f"built in {built:.0f} s; max rel |exit - ORT fp32| {max(diffs):.3g}"
            if y is not None:
                acc = [100 * float(np.mean(g.argmax(1) == y)) for g in got]
                acc32 = [100 * float(np.mean(r.argmax(1) == y)) for r in ref]
                detail += "; accuracy per exit " + " ".join(f"{a:.2f}" for a in acc) + \
                          " (ORT fp32 " + " ".join(f"{a:.2f}" for a in acc32) + ")"
            limit = {Precision.FP32: 1e-2, Precision.FP16: 5e-2, Precision.INT8: 0.5}[precision]
            record(f"{name} {key}", "verified" if max(diffs) <= limit else "CHECK", detail)
            rep = bench(root, key, batch_sizes=(1, 8), repeats=50)
            (out / f"{name}-{key}-bench.txt").write_text(rep.render() if hasattr(rep, "render") else str(rep))
            record(f"{name} {key} timing", "measured", f"see {name}-{key}-bench.txt")
        except Exception as exc:
            (out / f"{name}-{key}-error.txt").write_text(traceback.format_exc())
            record(f"{name} {key}", "FAILED", str(exc)[:200])
PY

echo
echo "== verified / not verified"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
! grep -q "FAILED" "$SUMMARY"
