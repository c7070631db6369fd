#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on the GPU machine and cannot find there (run here, with pip's index):
#   .whl/         wheels of the packages the machine's image lacks, at the versions .venv has, for CPython
#                 3.12 on manylinux x86_64: the server (fastapi, pydantic, uvicorn; fastapi imports
#                 opentelemetry-api), `dporm score`'s data loading (datasets) and TRL's Triton log-prob
#                 kernel (the peer in bench/token_logprobs.py)
#   .gpu_assets/  the default model's config, tokenizer and chat template (no weights: gpu_check.sh makes
#                 random ones) and the RewardBench sample bench/logprobs_core.py reads from ../shared,
#                 which does not travel
# Both are ignored through .git/info/exclude; name both in `carry`. Usage: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# The image has anyio, h11, click, annotated-doc, pyarrow, pandas, xxhash, fsspec and huggingface-hub. It has
# typing-extensions too, but pydantic 2.14 needs >= 4.16, likely newer than the image's: carried, it shadows that.
PACKAGES=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
          opentelemetry-api uvicorn datasets dill multiprocess trl)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for pattern in /.whl/ /.gpu_assets/; do
    grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >>"$exclude"
done

rm -rf .whl && mkdir .whl
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$($PY -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
echo "downloading: ${pins[*]}"
platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
$PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${pins[@]}"
[ "$(ls .whl/*.whl | wc -l)" -eq "${#PACKAGES[@]}" ] || { echo "expected ${#PACKAGES[@]} wheels" >&2; exit 1; }

rm -rf .gpu_assets && mkdir -p .gpu_assets/models/smollm2-135m-instruct .gpu_assets/data
model=$($PY -c 'from dpo.default_model import pull_default_model; print(pull_default_model())' | tail -1)
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu_assets/models/smollm2-135m-instruct/ \;
cp ../shared/data/rewardbench/filtered-sample.jsonl .gpu_assets/data/

ls -l .whl
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu_assets | tail -1 | cut -f1)
echo "working tree $((tree / 1024)) KiB + .whl and .gpu_assets $((carried / 1024)) KiB" \
    "= $(((tree + carried) / 1048576)) MiB of the 64 MiB that travel"
