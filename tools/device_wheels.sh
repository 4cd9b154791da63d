#!/usr/bin/env bash
# Wheels for a lent CUDA machine whose image lacks some of lrulm's packages (grain,
# array-record, portpicker, ml-collections; jax, flax, optax, orbax, sentencepiece are
# there), downloaded here into .whl/ (git-ignored locally) for Python 3.12 / x86-64.
#
#   bash tools/device_wheels.sh        # once, on this machine
#   # then on the device, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
versions=$(python3 - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("grain", "array_record", "portpicker", "ml_collections")))
PY
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl $versions
ls -la .whl
