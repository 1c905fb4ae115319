#!/usr/bin/env bash
# Here (the CPU machine), before a device session: what benchmarks/gpu_session.sh needs on a
# GPU machine that reaches no network and has no ../shared. Both folders are git-ignored
# (.git/info/exclude) and travel when the device call carries them:
#   .whl/       hydra-core, omegaconf, antlr4, starlette, uvicorn as wheels (the GPU image
#               lacks them; the PPO services' test needs the last two)
#   .gpu_data/  the two public prompt files of the realistic workload and its trained
#               4M-parameter model (trained here first if runs/bench_generation has none)
#
#   bash benchmarks/gpu_prepare.sh    # then: device run `bash benchmarks/gpu_session.sh`, carry [.whl, .gpu_data]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for folder in /.whl/ /.gpu_data/; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0 \
  starlette==1.10.0 uvicorn==0.54.0
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only: a pure-Python wheel
PYTHONPATH=benchmarks "$PY" -c "
from pathlib import Path
from realistic_generation import trained_checkpoint
print('benchmark model:', trained_checkpoint(Path('runs/bench_generation')))"
rm -rf .gpu_data && mkdir -p .gpu_data/data
"$PY" - <<'PYEOF'
import shutil
from pathlib import Path
import sys
sys.path.insert(0, "benchmarks")
from realistic_generation import DATA, SOURCES

for _, _, path in SOURCES:
    (Path(".gpu_data/data") / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / path, Path(".gpu_data/data") / path)
PYEOF
cp -r runs/bench_generation .gpu_data/bench_generation
du -sh .whl .gpu_data
