#!/bin/bash
# kernel_tokens_gpu.py with one variant per process under a time limit, so that a variant which
# hangs the GPU (four compute warpgroups did: BUILD_NOTES, session 12) costs only its
# limit. The default block sizes run first, with the XLA path and the variants in BASE (the load
# probe unless set; BASE="" for none of those; BASE=none skips this run). On the device, from
# the repo root:
#     SHAPES=4096x14336 TOKENS=1,16 LIMIT=120 bash experiments/kernel_variants_safe.sh "k256 s3 d32 c200" ...
cd "$(dirname "$0")" || exit 1
LIMIT=${LIMIT:-120}
[ "${BASE-}" != none ] && VARIANTS=${BASE-"k256 s2 c200 d32 pload"} timeout "$LIMIT" \
    python3 kernel_tokens_gpu.py 2>&1 | grep -v "^[WI]1"
for v in "$@"; do
    ONLY_VARIANTS=1 VARIANTS="$v" timeout "$LIMIT" python3 kernel_tokens_gpu.py 2>&1 \
        | grep -v "^[WI]1\|^NVIDIA"
    status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && echo "variant '$v': no result in ${LIMIT} s (killed)"
done
