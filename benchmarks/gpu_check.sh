#!/usr/bin/env bash
# Every GPU check and figure in one go, logged to a folder: the gpu-marked tests, convnet bench on a
# 60,000-image epoch, the inference/training probe, the recipe sweep (validation split) and the
# measurement of its pick (test set), and the wall time of `convnet train` on the GPU.
# Usage (from the repository root, on a machine with a CUDA GPU and Fashion-MNIST installed):
#   benchmarks/gpu_check.sh LOG_DIR [STEPS]      STEPS: any of tests,bench,probe,tune,wall,best,suite
set -u
out=${1:-gpu-logs}
steps=${2:-tests,bench,probe,tune,wall}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
has() { [[ ",$steps," == *",$1,"* ]]; }
stamp() { echo "== $(date +%T) $*" | tee -a "$out/steps.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/machine.txt" 2>&1
$py -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" >> "$out/machine.txt"
nproc >> "$out/machine.txt"
if has tests; then
  stamp tests
  timeout ${T_TESTS:-150} $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -40 > "$out/tests.txt"
fi
if has bench; then
  stamp bench
  timeout ${T_BENCH:-100} $py -m convnet bench --device cuda --train-images 60000 --repeats 3 --json > "$out/bench.json" 2> "$out/bench.err"
fi
if has probe; then
  stamp probe
  timeout ${T_PROBE:-100} $py benchmarks/gpu_probe.py > "$out/probe.txt" 2>&1
fi
if has tune; then
  stamp tune
  timeout ${T_TUNE:-200} $py benchmarks/tune_gpu_recipe.py all --seeds 5 > "$out/tune.txt" 2>&1
fi
if has wall; then
  stamp wall
  wall_run=$(mktemp -d -u)
  /usr/bin/time -f "wall %e s" timeout 120 $py -m convnet train --device cuda --out "$wall_run" --no-progress \
    > "$out/wall.txt" 2>&1
  $py - >> "$out/wall.txt" 2>&1 <<'PY'
import time
t = [time.perf_counter()]
def lap(what):
    t.append(time.perf_counter()); print(f"{what:<34} {t[-1] - t[-2]:6.2f} s")
import torch; lap("import torch")
import convnet.tools.experiment; lap("import convnet (train path)")
import torch._dynamo; lap("import torch._dynamo (optimizers)")
import sklearn.metrics; lap("import sklearn.metrics")
torch.zeros(1, device="cuda"); lap("CUDA context")
from convnet.data.named import load_dataset
ds = load_dataset("fashion-mnist"); lap("read Fashion-MNIST")
ds.train.images.cuda(); ds.test.images.cuda(); torch.cuda.synchronize(); lap("copy to the GPU")
PY
fi
if has best; then
  stamp best
  timeout 420 $py benchmarks/tune_gpu_recipe.py measure --best-pick "${BEST_PICK:-airnet-wide e40}" \
    --best-seeds 3 > "$out/best.txt" 2>&1
fi
if has suite; then
  stamp suite
  timeout 420 $py -m pytest -q -x -m "not slow" -n 8 -p no:cacheprovider 2>&1 | tail -30 > "$out/suite.txt"
fi
stamp done
tail -n 5 "$out"/*.txt
