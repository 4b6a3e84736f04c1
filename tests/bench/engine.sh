#!/usr/bin/env bash
# The engine benchmark against llama.cpp (see engine.py). First run builds
# llama-cpp-python from source (~20 minutes on 2 cores) into a venv under
# the cache dir; later runs reuse it.
set -euo pipefail
source "$(dirname "$0")/release.sh"
threads="${BENCH_THREADS:-2}"
gguf="$("$bin" fetch-models | sed -n 's/^chat model: //p')"

venv="$cache/llama-venv"
if ! "$venv/bin/python" -c "import llama_cpp, matplotlib" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_BUILD_PARALLEL_LEVEL="$threads" "$venv/bin/pip" install -q 'llama-cpp-python[server]==0.3.36' matplotlib
fi
# llama.cpp's AMX buffer type segfaults on this CPU; the shim turns extra
# buffer types off (it lives in ../shared/tools, or set LLAMA_SHIM_DIR).
shim="${LLAMA_SHIM_DIR:-$(cd .. && pwd)/shared/tools}"

"$venv/bin/python" tests/bench/engine.py --infermesh "$bin" --llama-python "$venv/bin/python" \
  --gguf "$gguf" --shim-dir "$shim" --threads "$threads" "$@"
