#!/usr/bin/env bash
# The CUDA path, checked and measured in one run on a GPU machine:
#   tests      the CUDA tests (tests/test_cuda.py) and the torch-side test modules, on the GPU
#   demo       the demo's pretrain stage (config/demo.yaml settings) with train.device: cuda
#   bench      benchmarks/train.py: variants x batch sizes at PBMC 3k lengths and at 480 tokens
#   full       the full-size model (config/config.yaml) pretrained on the demo's shards
# Each part has its own time limit and log; a part that fails or runs out of time does not stop
# the others. Logs, JSON and models go to a work folder, packed at the end into
# $OUT/gpu_check.tar.gz (OUT default: benchmarks/runs/gpu).
#
#   make demo                                  # here: the demo's shards and args.json
#   OUT=/some/dir bash benchmarks/gpu_check.sh [part ...]   # on the GPU machine; default: all parts
#
# Needs python3 with torch (CUDA build), numpy, scipy, pandas, h5py, pyyaml, matplotlib, pytest and
# anndata; PIP_WHEELS=dir installs wheels from dir first (a machine without a package index).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/gpu}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
RUN=$WORK/gpu_check
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the demo run's shards, in the data folder its run.json names
SHARDS=$($PY -c 'from scllm.provenance import run_data_files as f
print(f("results/demo")["shards"] / "manifest.json")')
PARTS=${*:-tests demo bench full}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu TRAIN_EXTRA="max_steps=3" tries the script where there is no GPU

if [ -n "${PIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$PIP_WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# part NAME LIMIT_S COMMAND...: run with a time limit (cut to what is left of DEADLINE seconds
# for the whole script, so the results are always packed), log to $RUN/NAME.log, print its end.
DEADLINE=${DEADLINE:-400}
part() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ $((DEADLINE - SECONDS - 10)) -lt "$limit" ]; then limit=$((DEADLINE - SECONDS - 10)); fi
    if [ "$limit" -lt 10 ]; then echo "=== $name: skipped, the deadline is near"; return; fi
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout --kill-after=5 "$limit" "$@" >"$RUN/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    grep -E "passed|failed|error|cells/s|MFU|epoch .* done|Error" "$RUN/$name.log" | tail -n 12
}

# params FILE SOURCE [KEY=VALUE ...]: model and train settings for python -m scllm.train, from a
# run's args.json or a config YAML, with train overrides.
params() {
    $PY - "$@" <<'EOF'
import json, sys, yaml
from scllm.config import DATA_MODEL_KEYS  # set by the shards, not by the settings
out, source, *overrides = sys.argv[1:]
cfg = json.load(open(source)) if source.endswith(".json") else yaml.safe_load(open(source))
model = {k: v for k, v in cfg["model"].items() if k not in DATA_MODEL_KEYS}
train = {k: v for k, v in cfg["train"].items() if v is not None}
for item in overrides:
    key, value = item.split("=", 1)
    train[key] = yaml.safe_load(value)
json.dump({"model": model, "train": train}, open(out, "w"), indent=1)
EOF
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"
    nproc
} >"$RUN/machine.txt" 2>&1
cat "$RUN/machine.txt"

for name in $PARTS; do
    case $name in
    tests)
        SCLLM_CUDA_REPORT=$RUN/cuda_report.json part tests 150 $PY -m pytest -q -p no:cacheprovider -rs \
            --continue-on-collection-errors tests/test_cuda.py tests/test_model.py tests/test_data.py \
            tests/test_objectives.py tests/test_train.py tests/test_tokens.py tests/test_embed.py tests/test_split.py
        cat "$RUN/cuda_report.json" 2>/dev/null
        ;;
    demo)
        params "$RUN/demo_params.json" results/demo/model/args.json device=$DEVICE num_threads=null ${TRAIN_EXTRA:-}
        part demo_pretrain 90 $PY -m scllm.train --manifest $SHARDS --out "$RUN/demo_model" \
            --params "$RUN/demo_params.json" --log-file "$RUN/demo_pretrain_rule.log"
        ;;
    bench)
        part bench_pbmc3k 100 $PY benchmarks/train.py --device cuda --manifest $SHARDS --cells 20000 \
            --warmup 3 --steps 15 --batch-size 32 128 512 --max-tokens 16384 65536 \
            --variants grouped_fp32 grouped_bf16 tokens_bf16 pad1201_fp32 --out "$RUN/train_cuda_pbmc3k.json"
        part bench_len480 50 $PY benchmarks/train.py --device cuda --mean-length 480 --cells 6000 \
            --warmup 3 --steps 10 --batch-size 32 128 --max-tokens 65536 \
            --variants grouped_bf16 tokens_bf16 --out "$RUN/train_cuda_len480.json"
        ;;
    compiled)
        part bench_compiled 150 $PY benchmarks/train.py --device cuda --manifest $SHARDS --cells 20000 \
            --warmup 5 --steps 15 --batch-size 128 512 --variants compiled_bf16 --out "$RUN/train_cuda_compiled.json"
        ;;
    full)
        params "$RUN/full_params.json" config/config.yaml device=$DEVICE epochs=2 warmup_steps=50 log_every_steps=20 ${TRAIN_EXTRA:-}
        part full_pretrain 80 $PY -m scllm.train --manifest $SHARDS --out "$RUN/full_model" \
            --params "$RUN/full_params.json" --log-file "$RUN/full_pretrain_rule.log"
        ;;
    *) echo "unknown part $name (tests demo bench compiled full)" ;;
    esac
done

# Pack logs, JSON and the demo model (small); leave out the full model's checkpoints (large).
tar -czf "$OUT/gpu_check.tar.gz" --exclude='full_model/*.pt' -C "$WORK" gpu_check
ls -la "$OUT"
