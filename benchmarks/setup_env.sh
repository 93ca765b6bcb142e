#!/usr/bin/env bash
# Creates the benchmark environment: a virtual environment on top of the project's (swsc_hf installed with
# scripts/install.sh) that adds the baselines (HQQ, optimum-quanto, torchao, GPTQModel, llama.cpp) and matplotlib.
# GPTQModel 7.7 needs torch>=2.14.1, so 7.6.0 (torch>=2.8, numpy==2.2.6) is pinned; its code is pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SWSC_BENCH_VENV:-$HOME/.venvs/swsc-bench}"
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q -c benchmarks/constraints.txt -r benchmarks/requirements.txt
# llama.cpp for the speed comparison on the same GGUF weights: PyPI has only the source, so this builds llama.cpp
# (about 10-15 minutes on 2 cores), for this CPU's instruction sets as llama.cpp users get it.
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/python" -m pip install -q "llama-cpp-python==0.3.36"
"$VENV/bin/python" -c "import swsc_hf, torch, transformers; print('benchmark env:', '$VENV', 'torch', torch.__version__, 'transformers', transformers.__version__)"
