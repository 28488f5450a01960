#!/usr/bin/env bash
# Prepares what scripts/gpu_check.sh carries to a GPU machine that has no internet (run it where pip reaches PyPI):
#   .whl/      Python 3.12 wheels of hydra-core 1.3, omegaconf, hydra-submitit-launcher, submitit, optuna and their
#              dependencies (antlr4-python3-runtime 4.9.3 has no wheel on PyPI: built here, it is pure Python)
#   .gl/data/  the real data the check trains on: DATA_DIR/mnist-5k (MNIST/raw/ IDX files) and 4,000 reviews of
#              DATA_DIR/aclImdb_train.tar.gz (2,000 per label), when they are there
#
#   bash scripts/gpu_prepare.sh DATA_DIR [PYTHON_VERSION]     # e.g. bash scripts/gpu_prepare.sh /datasets 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash scripts/gpu_prepare.sh DATA_DIR [PYTHON_VERSION]}
py=${2:-3.12}
mkdir -p .whl .gl/data
python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
python -m pip download -q --only-binary=:all: --find-links .whl --python-version "$py" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d .whl "hydra-core>=1.3.2,<1.4" "hydra-submitit-launcher>=1.2.0" submitit "optuna>=4.0"
if [ -d "$data/mnist-5k/MNIST/raw" ]; then
  rm -rf .gl/data/mnist-5k && cp -r "$data/mnist-5k" .gl/data/mnist-5k
fi
if [ -f "$data/aclImdb_train.tar.gz" ]; then
  rm -rf .gl/data/imdb && mkdir -p .gl/data/imdb
  tmp=$(mktemp -d)
  tar -xzf "$data/aclImdb_train.tar.gz" -C "$tmp"
  for label in pos neg; do
    mkdir -p ".gl/data/imdb/aclImdb/train/$label"
    # the list goes through a file: `find | head` under pipefail ends the script when head closes the pipe early
    find "$tmp/aclImdb/train/$label" -name '*.txt' | sort >"$tmp/$label.list"
    head -n 2000 "$tmp/$label.list" | xargs -I{} cp {} ".gl/data/imdb/aclImdb/train/$label/"
  done
  rm -rf "$tmp"
fi
du -sh .whl .gl/data
