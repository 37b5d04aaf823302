#!/usr/bin/env bash
# bench/gpu_check.py on the lent GPU machine, from the repository root, with .whl carried:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=...)
# .whl/*.whl: the diffusers/transformers/huggingface_hub/tokenizers our tests use (and xformers);
# .whl/cu12/: CUDA 12's runtime for xformers' wheel, loaded by the script itself (not installed).
# Results: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD/src
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-390}" \
    python3 bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
