#!/usr/bin/env bash
# The GPU check: every GPU path of gradlab once, as one table, in under 8 minutes on one GPU.
#
#   bash scripts/gpu_prepare.sh DATA_DIR      # here, once: wheels for the GPU machine's Python + data into .gl/
#   bash scripts/gpu_check.sh OUT_DIR         # on the GPU machine: prints the table, writes OUT_DIR/gpu_check.md
#   bash scripts/gpu_check.sh OUT_DIR --device cpu --quick     # the same sections on this CPU, a few steps each
#
# The GPU machine's Python has its own torch (any 2.4+ works: gradlab does not need the pinned 2.14.1), Lightning,
# TensorBoard, tokenizers, rich and matplotlib, but not Hydra, OmegaConf, submitit or Optuna: those come from the
# wheels in .whl/ (scripts/gpu_prepare.sh), installed without an index. gradlab itself runs from src/ (PYTHONPATH),
# so nothing of the machine's own packages is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--device cpu] [--quick]}
shift
if ! python -c "import hydra, omegaconf, submitit, optuna" 2>/dev/null; then
  [ -d .whl ] || { echo "error: hydra/omegaconf/submitit/optuna are missing and there is no .whl/ folder: run" \
                        "bash scripts/gpu_prepare.sh DATA_DIR first, where pip can reach PyPI." >&2; exit 2; }
  python -m pip install -q --no-index --find-links .whl hydra-core hydra-submitit-launcher submitit optuna
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
args=()
[ -d .gl/data/mnist-5k/MNIST/raw ] && args+=(--mnist "$PWD/.gl/data/mnist-5k")
[ -d .gl/data/imdb/aclImdb/train ] && args+=(--imdb "$PWD/.gl/data/imdb")
timeout 470 python scripts/gpu_check.py --out "$out" "${args[@]}" "$@"
