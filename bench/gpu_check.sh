#!/usr/bin/env bash
# python -m bench.gpu_check on a machine without internet access: installs the wheels carried in .whl/
# (open_clip_torch 3.3.0 and the packages it needs that such a machine may lack: ftfy, wcwidth)
# into /tmp/site once, then runs the check unbuffered from the repository root. Arguments go to bench/gpu_check.py.
#   bash bench/gpu_check.sh --quick --out DIR
set -u
cd "$(dirname "$0")/.." || exit 2   # the repository root, where .whl/ is
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import open_clip" 2>/dev/null; then
  if [ ! -d /tmp/site/open_clip ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 2; }
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 -m bench.gpu_check "$@"
