#!/usr/bin/env bash
# Every check of dporm that needs a GPU, in one call of the device tool (estimated 5-7 minutes on an H200; a
# deadline, GPU_CHECK_DEADLINE=480 s, cuts later steps short so the whole run ends within ~8.5 minutes).
#
#   1. here, once (pip's index; writes the ignored folders .whl and .gpu_assets, ~9 MiB): bash bench/gpu_wheels.sh
#   2. device tool, one call:  run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu_assets"], timeout_s=600)
#   3. read <files_at>/gpu_check.log (every step's output, "=== NAME: rc=N", a summary last) and the JSON
#      results beside it: token_logprobs.json, logprobs_core_fp32.json, logprobs_core_bf16.json.
#
# Steps (each runs whatever the earlier ones did; the exit status is 1 if any failed): install the carried
# wheels; nvidia-smi and versions; a randomly initialised SmolLM2-135M (the real weights do not travel) as
# the default model in $DPORM_CACHE_DIR; pytest on the compiled Triton kernels, the log-prob core, scorer,
# bf16-paired and recheck, batching and the server (-m "not integration": those need the real weights);
# bench/token_logprobs.py and bench/logprobs_core.py (fp32 and bf16) writing JSON into $OUT.
# CPU rehearsal of the plumbing, few tests and tiny sizes: GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD CPU=${GPU_CHECK_ALLOW_CPU:-} WORK=${TMPDIR:-/tmp}/dporm-gpu-check
OUT=${OUT:-$ROOT/bench/results/gpu_check}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$ROOT DPORM_CACHE_DIR=$WORK/cache
PYTEST=(-m pytest -x -q -rs -m "not integration" -p no:cacheprovider --durations=5)
KERNELS=(tests/test_token_logprobs.py tests/test_linear_logprobs.py)
CORE=(tests/test_logprobs.py tests/test_packing.py tests/test_scorer.py tests/test_scorer_dtypes.py
      tests/test_paired.py tests/test_recheck.py tests/test_batching.py)
SERVER=(tests/test_server.py tests/test_server_queue.py tests/test_server_hardening.py)
TOKEN=(--rows 16384 --repeats 5)  # 20 cases, a process each: ~3 s apiece, ~7 s with TRL's import
LOGPROBS=(--pairs 128 --batch-pairs 32 --repeats 3)  # 256 sequences of <= 912 tokens
if [ -n "$CPU" ]; then  # rehearsal: the same steps with one test or two each and tiny benchmarks
    PY=${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python} DEADLINE=${GPU_CHECK_DEADLINE:-900}
    KERNELS+=(-k "hand_computed or three_d")
    CORE=(tests/test_batching.py tests/test_recheck.py::test_score_command_reports_rechecked_pairs)
    SERVER=(tests/test_server.py tests/test_server_queue.py -k "definition or score_command or after_the_worker")
    TOKEN=(--rows 256 --vocab 2048 --dtypes fp32 --modes fwd --linear-rows 256 --hidden 64 --repeats 1)
    LOGPROBS=(--pairs 2 --batch-pairs 2 --repeats 1)
else
    PY=${GPU_CHECK_PYTHON:-python3} DEADLINE=${GPU_CHECK_DEADLINE:-480}
fi
RESULTS=() FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...: runs it within the time left, records its rc, never stops the script
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
    if ((limit < 15)); then rc=124 && echo "=== $name: skipped, the deadline is near"; else
        echo "=== $name (at ${SECONDS}s, limit ${limit}s): $*"
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/step.log"
        rc=${PIPESTATUS[0]} && [ -n "$(tail -c 1 "$WORK/step.log")" ] && echo  # after pytest's dots
        ((rc == 0)) && grep -q "^case failed" "$WORK/step.log" && rc=1  # bench/token_logprobs.py goes on
        echo "=== $name: rc=$rc in $((SECONDS - start))s"
    fi
    RESULTS+=("$name rc=$rc") && ((rc == 0)) || FAILED=1
}

main() {
    echo "dporm gpu_check, $(date -u +%FT%TZ), $(git log -1 --format=%h 2>/dev/null || echo 'no git'), OUT=$OUT"
    if [ -z "$CPU" ]; then
        [ -d .whl ] && step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$WORK/site" .whl/*.whl && export PYTHONPATH=$WORK/site:$ROOT
        step nvidia-smi 30 nvidia-smi
    fi
    step versions 90 "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, flush=True)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
bad = [] if torch.cuda.is_available() or os.environ.get("GPU_CHECK_ALLOW_CPU") else ["no GPU: kernels would run interpreted"]
for dist, module in [("triton", "triton"), ("transformers", "transformers"), ("typing-extensions", "typing_extensions"),
                     ("fastapi", "fastapi"), ("pydantic", "pydantic"), ("uvicorn", "uvicorn"), ("datasets", "datasets"),
                     ("pyarrow", "pyarrow"), ("fsspec", "fsspec"), ("trl", "trl.trainer.utils")]:
    try:
        print(f"{dist:18} {md.version(dist):12} {importlib.import_module(module).__file__}", flush=True)
    except Exception as e:  # noqa: BLE001 - report them all
        bad.append(f"{dist}: {e!r}")
sys.exit("\n".join(bad) or None)
EOF
    step random-model 120 "$PY" - .gpu_assets/models/smollm2-135m-instruct "$DPORM_CACHE_DIR/models" <<'EOF'
import shutil, sys, tempfile, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
target = Path(sys.argv[2]) / Path(sys.argv[1]).name  # config, tokenizer, chat template and marker from here
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(sys.argv[1], target)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target))
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    shutil.move(f"{tmp}/model.safetensors", target / "model.safetensors")
print(f"{target}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters")
EOF
    local xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${GPU_CHECK_WORKERS:-4}")
    step tests-kernels 120 "$PY" "${PYTEST[@]}" "${xdist[@]}" "${KERNELS[@]}"
    step tests-core 120 "$PY" "${PYTEST[@]}" "${xdist[@]}" "${CORE[@]}"
    step tests-server 120 "$PY" "${PYTEST[@]}" "${SERVER[@]}"
    step bench-token-logprobs 150 "$PY" bench/token_logprobs.py "${TOKEN[@]}" --output "$OUT/token_logprobs.json"
    for dtype in fp32 bf16; do
        step "bench-logprobs-core-$dtype" 60 "$PY" bench/logprobs_core.py "${LOGPROBS[@]}" --dtype $dtype \
            --data .gpu_assets/data/filtered-sample.jsonl --output "$OUT/logprobs_core_$dtype.json"
    done
    echo "=== summary after ${SECONDS}s: $( ((FAILED)) && echo 'SOME STEP FAILED' || echo 'all passed')"
    printf '    %s\n' "${RESULTS[@]}"
    return $FAILED
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
