#!/bin/bash
# One device-machine session for the GPU figures, run from the repository root there:
#   here:  pip download -d /tmp/wheels --no-deps thop fastapi starlette pydantic annotated-types \
#              typing-inspection uvicorn h11 python-multipart httpx httpcore anyio sniffio idna certifi
#          pip download -d /tmp/wheels --no-deps --only-binary=:all: --python-version 312 \
#              --platform manylinux_2_17_x86_64 pydantic-core          (one per Python the machine may have)
#          python benchmarks/device/pack.py --data ../shared/datasets/clothing-dataset-small \
#              --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --wheels /tmp/wheels \
#              --quality 70      (JPEG q70 keeps data, weights and wheels at 55 MiB, inside what the tool carries;
#                                 the H200 machine has Python 3.12, so one pydantic-core wheel: cp312)
#   then:  run(command="bash benchmarks/device/session.sh", carry=[".device"], timeout_s=580)
# Uses the machine's own torch/timm/accelerate; what it lacks (thop, the server's packages) comes as
# wheels in .device/wheels, installed offline into /tmp/extra. Everything lands in one archive,
# $OUT/results.tgz (the tool returns at most 8 files), written even when the run is cut short.
# STEPS picks parts for a short follow-up session (default: all, in this order):
#   train40 evaluate predict throughput compare cams serve compile
# compare, cams and serve use the 40-epoch run, or the compiled run where only that one was trained.
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
STEPS=" ${STEPS:-train40 evaluate predict throughput compare cams serve compile} "
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 2 ))
want() { [[ "$STEPS" == *" $1 "* ]]; }
command -v nvidia-smi >/dev/null || nvidia-smi() { echo "no nvidia-smi"; }
if ls .device/wheels/*.whl >/dev/null 2>&1; then
    # pure-Python wheels, and the binary ones built for this Python (a wheel for another one is left out)
    TAG=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    WHEELS=$(ls .device/wheels/*.whl | grep -E -- "-(py3-none-any|$TAG-$TAG-[^/]*)\.whl$")
    python3 -m pip install -q --no-index --no-deps --target /tmp/extra $WHEELS 2>&1 | tail -3
    export PYTHONPATH=$PYTHONPATH:/tmp/extra
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 --version
  python3 -c "import torch, timm, accelerate; print(torch.__version__, timm.__version__, accelerate.__version__)"
} 2>&1 | tee "$RES/env.txt"
COMMON=(--output-dir /tmp/runs --set data.num_workers=$WORKERS --set data.cache_dir=/tmp/cache)

# The earlier 40-epoch recipe: wall time including start-up and the first decode (cache built here).
if want train40; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 > "$RES/gpu_util.csv" &
    SMI=$!
    start=$EPOCHREALTIME
    python3 -m clothcli train conf/mobilenet.yaml --data $DATA --weights "$WEIGHTS" --name gpu-40 --epochs $EPOCHS \
        "${COMMON[@]}" 2>&1 | tee "$RES/train.log"
    awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "wall_s %.1f\n", b - a }' | tee "$RES/train_wall.txt"
    kill $SMI 2>/dev/null
    cp -r /tmp/runs/gpu-40/metrics.csv /tmp/runs/gpu-40/best /tmp/runs/gpu-40/swa "$RES/" 2>/dev/null
fi
if want evaluate; then
    for ckpt in /tmp/runs/gpu-40 /tmp/runs/gpu-40/swa; do
        # the whole output to a file: a pipe closed early would kill the command before it writes its JSON
        python3 -m clothcli evaluate $ckpt $DATA --split test --json "$RES/eval_$(basename $ckpt).json" \
            > "$RES/eval_$(basename $ckpt).log" 2>&1
        head -3 "$RES/eval_$(basename $ckpt).log"
    done
fi
# predict on the GPU against the plain CPU loop (same outputs?), then training throughput vs plain.
if want predict; then
    python3 benchmarks/predict_throughput.py /tmp/runs/gpu-40 $DATA --workers $WORKERS --json "$RES/predict.json" \
        > "$RES/predict.log" 2>&1
    tail -11 "$RES/predict.log"
fi
if want throughput; then
    python3 benchmarks/train_throughput.py --data $DATA --weights "$WEIGHTS" --size 224 --batch 256 \
        --workers $WORKERS --epochs $BENCH_EPOCHS --json "$RES/train_throughput.json" > "$RES/throughput.log" 2>&1
    tail -14 "$RES/throughput.log"
fi
# torch.compile (inductor): the first step's time (compilation included) is printed apart, and the later
# epochs show the compiled speed. Last in a full session, so the figures above survive a cut.
compile_run() {
    python3 -m clothcli train conf/mobilenet.yaml --data $DATA --weights "$WEIGHTS" --name gpu-compile --epochs 5 \
        "${COMMON[@]}" --set train.compile=inductor 2>&1 | tee "$RES/train_compile.log"
}
RUN=/tmp/runs/gpu-40
if [ ! -d $RUN ] && want compile; then compile_run; RUN=/tmp/runs/gpu-compile; fi
# The backend interface on a GPU: the run and its SWA checkpoint side by side through the PyTorch backend
# (uint8 batches normalised on the device), latency timed there too.
if want compare; then
    python3 -m clothcli compare $RUN $RUN/swa --data $DATA --split test --device cuda \
        --no-cache -o "$RES/compare_gpu.json" > "$RES/compare.log" 2>&1
    tail -8 "$RES/compare.log"
fi
# Class-activation maps of the run's test mistakes, drawn on the GPU (only where pytorch-grad-cam and
# OpenCV are installed there).
if want cams; then
    if python3 -c "import pytorch_grad_cam" 2>/dev/null; then
        python3 -m clothcli evaluate $RUN $DATA --split test --cam "$RES/cams" \
            --json "$RES/eval_cam.json" > "$RES/cams.log" 2>&1
        tail -16 "$RES/cams.log"
    else
        echo "maps skipped: no pytorch-grad-cam here" | tee "$RES/cams.txt"
    fi
fi
# The server on the GPU under 32 clients (FastAPI, uvicorn and httpx come as wheels where the machine lacks them).
if want serve; then
    if python3 -c "import fastapi, uvicorn, httpx, multipart" 2>/dev/null; then
        python3 benchmarks/serve_load.py $RUN --data $DATA/validation --seconds 20 \
            --json "$RES/serve_load.json" > "$RES/serve_load.log" 2>&1
        tail -8 "$RES/serve_load.log"
    else
        echo "serve load skipped: no fastapi/uvicorn/httpx here" | tee "$RES/serve_load.txt"
    fi
fi
if [ "$RUN" = /tmp/runs/gpu-40 ] && want compile; then compile_run; fi
