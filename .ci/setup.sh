#!/usr/bin/env bash
# Create .venv at the repo root (if missing) and install dporm with its dev extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# Install torch first, pinned, from pip's configured sources (set TORCH_INDEX_URL to a CPU wheel index where the
# default index would give a multi-GB CUDA build); the project's own torch requirement is then already met.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# RewardBench's DPO runner is a test oracle and benchmark baseline; its own dependency pins are not wanted.
.venv/bin/python -c 'import importlib.util as u; exit(u.find_spec("rewardbench") is None)' 2>/dev/null \
    || .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "rewardbench==0.1.4"
# Its wheel also installs top-level 'tests', 'scripts' and 'analysis' packages, which would shadow ours.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$SITE/tests" "$SITE/scripts" "$SITE/analysis"
