#!/usr/bin/env bash
# Install Mirador into ./.venv on a machine that has only Python 3.10+ and pip.
#   scripts/setup.sh          runtime: torch first (a CPU build unless MIRADOR_TORCH says otherwise), then mirador
#   scripts/setup.sh --test   the same plus what the tests need
# torch goes first on purpose: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
python_bin="${PYTHON:-python3}"
torch_spec="${MIRADOR_TORCH:-torch==2.13.0}"

if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

if python -c "import torch" 2>/dev/null; then
  echo "==> torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
  echo "==> installing $torch_spec (set MIRADOR_TORCH to choose another build)"
  python -m pip install --progress-bar on "$torch_spec"
fi

echo "==> installing mirador$extras"
python -m pip install --progress-bar on -e ".$extras"

echo "==> building the embedded default model (offline, once)"
mirador default-model >/dev/null
echo "==> ready: .venv/bin/mirador up   |   .venv/bin/python -m pytest"
