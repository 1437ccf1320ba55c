#!/bin/bash
# One device-machine session for the GPU figures, run from the repository root there:
#   here:  python benchmarks/device/pack.py --data ../shared/datasets/clothing-dataset-small \
#              --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors
#   then:  run(command="bash benchmarks/device/session.sh", carry=[".device"], timeout_s=540)
# Uses the machine's own torch/timm/accelerate (nothing installed). Everything lands in one archive,
# $OUT/results.tgz (the tool returns at most 8 files), written even when the run is cut short.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RES=/tmp/results; mkdir -p "$RES" "$OUT"
trap 'tar czf "$OUT/results.tgz" -C "$RES" .' EXIT
# DATA, WEIGHTS, EPOCHS, BENCH_EPOCHS may be set to dry-run it on a CPU with tiny data first.
DATA=${DATA:-.device/data}
WEIGHTS=${WEIGHTS:-$(ls .device/weights/*.safetensors | head -1)}
EPOCHS=${EPOCHS:-40}
BENCH_EPOCHS=${BENCH_EPOCHS:-3}
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 2 ))
command -v nvidia-smi >/dev/null || nvidia-smi() { echo "no nvidia-smi"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, timm, accelerate; print(torch.__version__, timm.__version__, accelerate.__version__)"
} 2>&1 | tee "$RES/env.txt"

# The earlier 40-epoch recipe: wall time including start-up and the first decode (cache built here).
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 > "$RES/gpu_util.csv" &
SMI=$!
start=$EPOCHREALTIME
python3 -m clothcli train conf/mobilenet.yaml --data $DATA --weights "$WEIGHTS" --name gpu-40 --epochs $EPOCHS \
    --output-dir /tmp/runs --set data.num_workers=$WORKERS --set data.cache_dir=/tmp/cache 2>&1 | tee "$RES/train.log"
awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "wall_s %.1f\n", b - a }' | tee "$RES/train_wall.txt"
kill $SMI 2>/dev/null
cp -r /tmp/runs/gpu-40/metrics.csv /tmp/runs/gpu-40/best /tmp/runs/gpu-40/swa "$RES/" 2>/dev/null
for ckpt in /tmp/runs/gpu-40 /tmp/runs/gpu-40/swa; do
    python3 -m clothcli evaluate $ckpt $DATA --split test --json "$RES/eval_$(basename $ckpt).json" 2>&1 | head -3
done
# predict on the GPU against the plain CPU loop (same outputs?), then training throughput vs plain.
python3 benchmarks/predict_throughput.py /tmp/runs/gpu-40 $DATA --workers $WORKERS --json "$RES/predict.json" 2>&1 | tail -11
python3 benchmarks/train_throughput.py --data $DATA --weights "$WEIGHTS" --size 224 --batch 256 \
    --workers $WORKERS --epochs $BENCH_EPOCHS --json "$RES/train_throughput.json" 2>&1 | tail -14
# The backend interface on a GPU: the run and its SWA checkpoint side by side through the PyTorch backend
# (uint8 batches normalised on the device), latency timed there too.
python3 -m clothcli compare /tmp/runs/gpu-40 /tmp/runs/gpu-40/swa --data $DATA --split test --device cuda \
    --no-cache -o "$RES/compare_gpu.json" 2>&1 | tail -8
# Class-activation maps of the GPU run's test mistakes, drawn on the GPU (only where pytorch-grad-cam is
# installed there: it is not in the machine's image; carry its wheels and ttach's to add it).
if python3 -c "import pytorch_grad_cam" 2>/dev/null; then
    python3 -m clothcli evaluate /tmp/runs/gpu-40 $DATA --split test --cam "$RES/cams" \
        --json "$RES/eval_cam.json" 2>&1 | tail -16
else
    echo "maps skipped: no pytorch-grad-cam here" | tee "$RES/cams.txt"
fi
# The server on the GPU under 32 clients (only where the machine has FastAPI, uvicorn and httpx).
if python3 -c "import fastapi, uvicorn, httpx, multipart" 2>/dev/null; then
    python3 benchmarks/serve_load.py /tmp/runs/gpu-40 --data $DATA/validation --seconds 20 \
        --json "$RES/serve_load.json" 2>&1 | tail -8
else
    echo "serve load skipped: no fastapi/uvicorn/httpx here" | tee "$RES/serve_load.txt"
fi
# torch.compile (inductor) last, so the figures above survive a cut: the first step's time (compilation
# included) is printed apart, and the later epochs show the compiled speed.
python3 -m clothcli train conf/mobilenet.yaml --data $DATA --weights "$WEIGHTS" --name gpu-compile --epochs 5 \
    --output-dir /tmp/runs --set data.num_workers=$WORKERS --set data.cache_dir=/tmp/cache \
    --set train.compile=inductor 2>&1 | tee "$RES/train_compile.log"
