#!/usr/bin/env bash
# Where a CUDA device is lent: the test suite's GPU tests (`-k cuda`; they skip without CUDA) and
# a tiny-model pipeline on the GPU through the command line, then the device's numbers.
# Under 8 minutes on one H100 (the tiny model: no download). Run from the repository root:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-$(mktemp -d)}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('device:', torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -k cuda tests/test_gpu.py \
  tests/test_eval_prefix.py
# the CLI end to end on the GPU: build the tiny model, run every stage, print the report
timeout 150 "$PY" - "$OUT" <<'PYEOF'
import json, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES
from hftlab.testing import build_tiny_llama, demo_corpus

out = Path(sys.argv[1])
model = build_tiny_llama(out / "model", demo_corpus())
overrides = [o for o in TINY_OVERRIDES if not o.startswith("model.precision")]
start = time.time()
(out / "tiny.yaml").write_text("seed: 0\n")
subprocess.run([sys.executable, "-m", "hftlab", "run", str(out / "tiny.yaml"), f"model.name={model}",
                f"cache_dir={out / 'cache'}", *overrides, "--out", str(out / "run")], check=True)
metrics = json.loads((out / "run" / "metrics.json").read_text())
assert metrics["device"].startswith("cuda"), metrics["device"]
print(f"tiny pipeline on {metrics['device']} ({metrics['precision']}) in {time.time() - start:.0f} s:",
      {k: round(v["seconds"], 1) for k, v in metrics["stages"].items()})
PYEOF
echo "gpu_check: ok"
