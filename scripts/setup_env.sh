#!/usr/bin/env bash
# Create the project's virtual environment and install the project into it.
# torch: an importable torch (e.g. the one in an NGC container) is reused through
# --system-site-packages and never reinstalled; otherwise the CPU build torch==2.13.0 is
# installed, because an unpinned torch would pull several GB of CUDA packages.
# Usage: scripts/setup_env.sh VENV_DIR [EXTRAS]   (EXTRAS e.g. "test")
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch already installed for $python"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
"$venv/bin/python" -m pip install --quiet -e "$target"
echo "setup: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)') in $venv"
