#!/usr/bin/env bash
# Create .venv/ beside this repository and install jaxgpt with its test, Hugging Face, web and parquet extras,
# at the versions in scripts/constraints.txt. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The browser test of `jaxgpt explore` drives Debian's Chromium through its chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "note: install chromium and chromium-driver (Debian packages) for the explore browser test"
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and explicitly: its CPU build. An unpinned `torch` resolves to a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[test,hf,web,parquet]"
echo "jaxgpt is installed in .venv/ (activate it with: . .venv/bin/activate)"
