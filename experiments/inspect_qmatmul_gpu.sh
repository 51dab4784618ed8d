#!/bin/bash
# Where the qmatmul kernel's time goes (4096x14336, M=1, NF4 + DQ): its PTX and Nsight Compute's
# stall reasons and instruction mix. On the device, from the repo root:
#     bash experiments/inspect_qmatmul_gpu.sh        (writes under $OUT, or /tmp/inspect)
set -u
OUT=${OUT:-/tmp/inspect}
mkdir -p "$OUT/dump"
export PYTHONPATH=.:${PYTHONPATH:-}
# 1. the kernel's PTX, as Mosaic GPU compiles it (its SASS dump needs nvdisasm, which the device
#    lacks: assemble the PTX elsewhere with ptxas from the nvidia-cuda-nvcc wheel, then
#    `cuobjdump -sass` from nvidia-cuda-cuobjdump; BUILD_NOTES, kernel v4)
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO="$OUT/dump" \
    python3 experiments/ncu_qmatmul_once.py > "$OUT/dump/stdout.txt" 2>&1
tar -C "$OUT" -czf "$OUT/dump.tgz" dump && rm -rf "$OUT/dump"
# 2. stall reasons and instruction counts of one launch (`--set full` crashed ncu here)
ncu --clock-control none --section WarpStateStats --section InstructionStats \
    --section SourceCounters --page raw -k regex:mosaic -c 1 \
    python3 experiments/ncu_qmatmul_once.py > "$OUT/ncu_raw.txt" 2>&1
grep -iE "stall|inst_executed_op|Duration|sass__inst_executed_per_opcode" "$OUT/ncu_raw.txt" | head -80
