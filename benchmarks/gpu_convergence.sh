#!/usr/bin/env bash
# The fair convergence study (issue 19) in two single-GPU calls, each under 9.5 minutes, results in one
# tarball per call under $OUT (or ./gpu_convergence_out).
#
#   bash benchmarks/gpu_convergence.sh prepare   # CPU, in the checkout the GPU call sends: token caches in
#                                                # .data_cache/ and pydantic wheels in .whl/ (carry both)
#   bash benchmarks/gpu_convergence.sh 23m       # call 1: 23M on the KJV, every sweep (~9 min)
#   bash benchmarks/gpu_convergence.sh 69m       # call 2: 69M on KJV + Shakespeare, centred on call 1's
#                                                # results (benchmarks/results/convergence_fair_h100.json)
#   bash benchmarks/gpu_convergence.sh report    # CPU: re-analyse the committed runs of both calls
#
# CPU check of the same commands at a tiny scale (what was run before handing this to a GPU):
#   EXTRA="$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import convergence as c; \
#     print(" ".join("--set=" + q for q in c.QUICK))')" WORKERS=2 BUDGET=60 bash benchmarks/gpu_convergence.sh 23m
#
# Each call: no new run starts after its --time-budget; runs in flight finish; a python that overruns is
# stopped by `timeout` and the report is rebuilt from what finished (--report-only), then tarred.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
out=${OUT:-gpu_convergence_out}
dev=${DEV_TAG:-$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').split()[0].lower()
                              if torch.cuda.is_available() else 'h100')" 2>/dev/null || echo h100)}
case $mode in
  prepare)
    for spec in kjv:4096 kjv_shakespeare:8192; do
      python3 -m launch.data prepare --corpus "${spec%%:*}" --vocab-size "${spec##*:}" --cache-dir .data_cache | tail -3
    done
    wheels=${DEVICE_WHEELS:-/work/shared/tools/device-wheels.sh}
    if [ -f "$wheels" ]; then bash "$wheels"; else
      mkdir -p .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
    fi
    echo "carry: .whl .data_cache"
    exit 0 ;;
  23m) plan=kjv23m; tag=fair_$dev; budget=${BUDGET:-445}; limit=525; workers=${WORKERS:-8}; centres="" ;;
  69m) plan=mix69m; tag=fair69m_$dev; budget=${BUDGET:-410}; limit=525; workers=${WORKERS:-3}
       # call 1's results: committed, or still in /tmp on a machine kept warm since call 1
       centres_file=${CENTRES:-}
       for f in benchmarks/results/convergence_fair_$dev.json /tmp/conv_results_kjv23m/convergence_fair_$dev.json \
                benchmarks/results/convergence_fair_h100.json benchmarks/results/convergence_fair_h200.json; do
         [ -z "$centres_file" ] && [ -f "$f" ] && centres_file=$f
       done
       centres="--centres-from ${centres_file:-none}" ;;
  report)  # re-analyse the committed results (JSON + <stem>_runs/) in place
    for pt in kjv23m:fair_$dev mix69m:fair69m_$dev; do
      python3 benchmarks/convergence.py --report-only --plan "${pt%%:*}" --tag "${pt##*:}" --runs-dir /nonexistent \
        --resume-from "benchmarks/results/convergence_${pt##*:}.json"
    done
    exit 0 ;;
  *) echo "usage: $0 prepare|23m|69m|report" >&2; exit 2 ;;
esac
[ -d .data_cache ] || { echo "no .data_cache/: run '$0 prepare' on the CPU side and carry it" >&2; exit 2; }
export PYTHONUNBUFFERED=1 STATELESS_OPT_CACHE=$PWD/.data_cache PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import pydantic" 2>/dev/null; then  # the GPU machine lacks pydantic; deepspeed is not needed
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
fi
runs=/tmp/conv_runs_$plan res=/tmp/conv_results_$plan
mkdir -p "$out" "$res"
common=(--plan "$plan" --tag "$tag" --runs-dir "$runs" --out-dir "$res" ${EXTRA:-})  # EXTRA: e.g. a CPU check's tiny model
{
  echo "=== $plan on $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")') ($(date +%T))"
  timeout -k 15 "$limit" python3 benchmarks/convergence.py "${common[@]}" $centres --workers "$workers" --threads 1 \
    --time-budget "$budget"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== exit $rc: report from the runs that finished"
    timeout 25 python3 benchmarks/convergence.py "${common[@]}" $centres --report-only
  fi
  echo "=== done ($(date +%T))"
} 2>&1 | tee "$out/convergence_${tag}_log.txt"
cp "$out/convergence_${tag}_log.txt" "$res/" 2>/dev/null
tar czf "$out/convergence_${tag}.tgz" -C "$res" .
ls -la "$out"
