#!/usr/bin/env bash
# One prepared device session: the GPU tests, then the generation and training benchmarks
# on the ~1B model, each under its own time limit, every log kept in $OUT.
#
#   bash benchmarks/gpu_session.sh                    # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh tests generation   # some parts only (tests, generation, training,
#                                                     # realistic, variants, profile, unfused, autotune)
#
# `generation` runs our engine as users get it (fused projections, mask attention, default
# compilation); `variants` measures our batch-1 and batch-32 decode step against the
# roofline compiled with coordinate-descent tuning (tuned matrix-vector reductions), then
# with FlexAttention decode; `profile` how busy the GPU is during a batch-1 step and which
# kernels take its time (benchmarks/decode_profile.py); `unfused` without fused
# projections; `autotune` with all of inductor's kernel tuning (several minutes of
# compilation). A device session has 15 minutes, a machine's start included: one call
# `tests generation variants` took 590 s on an H100 (its FlexAttention variant cut off).
# Next: `tests generation` (about 5 minutes), then `profile unfused realistic`, then `training`.
#
# benchmarks/gpu_prepare.sh makes what it needs here first: the packages the GPU image lacks
# (hydra-core, omegaconf, antlr4, starlette, uvicorn) as wheels in .whl/, installed to
# /tmp/site there, and the realistic workload's prompts and trained model in .gpu_data/
# (carry both folders).
set -u
PARTS=${*:-tests generation}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/device.txt"
set -o pipefail
[[ $PARTS == *tests* ]] && timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 \
  | tee "$OUT/gpu_tests.log"
[[ $PARTS == *generation* ]] && { timeout 300 python3 benchmarks/generation_throughput.py --model 1b --batch 1 32 --new 256 --rounds 2 2>&1 \
  | tee "$OUT/generation.log" \
  || timeout 150 python3 benchmarks/generation_throughput.py --model 1b --batch 1 32 --new 256 --rounds 2 \
    --compile 0 2>&1 | tee "$OUT/generation_uncompiled.log"; }
[[ $PARTS == *training* ]] && timeout 150 python3 benchmarks/train_step_throughput.py --model 1b --seq 4096 --batch 1 --steps 5 --rounds 2 2>&1 \
  | tee "$OUT/train.log"
[[ $PARTS == *realistic* && -d .gpu_data ]] && timeout 300 python3 benchmarks/generation_throughput.py \
  --workload realistic --data .gpu_data/data --cache .gpu_data/bench_generation --batch 32 128 --n 1 4 \
  --new 256 --rounds 2 2>&1 | tee "$OUT/realistic.log"
VARIANT="python3 benchmarks/generation_throughput.py --model 1b --batch 1 32 --new 256 --rounds 2 --roofline-only"
[[ $PARTS == *variants* ]] && { timeout 240 $VARIANT --compile-mode coordinate-descent 2>&1 | tee -a "$OUT/variants.log"
  timeout 150 $VARIANT --attention flex 2>&1 | tee -a "$OUT/variants.log"; }
[[ $PARTS == *profile* ]] && timeout 150 python3 benchmarks/decode_profile.py --batch 1 --new 64 2>&1 \
  | tee "$OUT/profile.log"
[[ $PARTS == *unfused* ]] && timeout 150 $VARIANT --fused 0 2>&1 | tee "$OUT/unfused.log"
[[ $PARTS == *autotune* ]] && timeout 400 $VARIANT --compile-mode max-autotune-no-cudagraphs 2>&1 \
  | tee "$OUT/autotune.log"
true  # a skipped last part is not a failure
