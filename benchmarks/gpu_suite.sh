#!/usr/bin/env bash
# The pending single-GPU measurements in one command, each part under its own time limit, so one lease
# does them all and a part that overruns costs only its own slot. Writes into $OUT (or ./gpu_suite_out)
# one tarball of benchmarks/results-style files plus a log.
#
#   bash benchmarks/gpu_suite.sh [step|memory ...]     # default: both (convergence: gpu_convergence.sh)
#
# Needs on the GPU machine: deepspeed + pydantic (../shared/tools/device-wheels.sh prepares .whl/; this
# script installs it when present).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_suite_out}
res=/tmp/gpu_suite_results
mkdir -p "$out" "$res"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && [ ! -d /tmp/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
fi
# integrations/ is installed as stateless_opt.integrations (pyproject's package-dir); from a bare
# checkout on PYTHONPATH it needs this link instead of an install
[ -e stateless_opt/integrations ] || ln -s ../integrations stateless_opt/integrations
[ -d .data_cache ] && export STATELESS_OPT_CACHE=$PWD/.data_cache
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').split()[0].lower())")
parts=${*:-step memory}
# the settings the step part times beside the defaults: what each fast path buys
STEP_VARIANTS=${STEP_VARIANTS:-"sinkgd:chunk_mb=256;sinkgd:stats_dtype=float32;sinkgd:fused=false;\
sinkgd:stats_dtype=float32,fused=false;sgdsai:fused=false;swan:whiten_batch_mb=128;swan:whiten_batch_mb=4096"}
for part in $parts; do
  echo "=== $part ($(date +%T))"
  case $part in
    step)  # the new SinkGD / SGD-SaI steps, SWAN's sub-batch knob, and each step's share of a training step
      timeout 300 python3 benchmarks/step_cost.py --preset 1.3b --train-step --variants "$STEP_VARIANTS" \
        --out "$res/step_cost_1.3b_fp32_${dev}_v3.json" ;;
    memory)  # the whole grid at world 1: every backend, checkpointing off and on, both models
      for model in ${MEMORY_MODELS:-1.3b 350m}; do
        timeout $([ $model = 1.3b ] && echo 300 || echo 200) python3 benchmarks/memory.py --model $model \
          --backends ${MEMORY_BACKENDS:-plain,zero1,zero2,zero3,fsdp2} --ckpt both --max-minutes $([ $model = 1.3b ] && echo 4.2 || echo 2.7) \
          --tag grid-v3 --out-dir "$res"
      done ;;
    convergence)  # the fair study needs its own call (~9 min): benchmarks/gpu_convergence.sh
      echo "convergence: run 'bash benchmarks/gpu_convergence.sh 23m' (and '69m') as calls of their own" ;;
    *) echo "unknown part $part" ;;
  esac
  tar czf "$out/gpu_suite_results.tgz" -C "$res" .  # after every part: a lease cut short keeps what ran
done 2>&1 | tee "$out/gpu_suite_log.txt"
ls -la "$out"
