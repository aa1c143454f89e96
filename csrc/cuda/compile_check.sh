#!/usr/bin/env bash
# Compile-only check of the CUDA sources, no GPU needed: nvcc compiles every .cu to an object for
# sm_80 and sm_90, and the host-side torch glue (*.cpp) is syntax-checked against torch's headers and
# the CUDA toolkit's. Fails (non-zero) on any compile error. Usage: csrc/cuda/compile_check.sh [nvcc]
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${1:-$(command -v nvcc)}"
# the toolkit's include dir, asked of nvcc itself (works through wrapper scripts)
CUDA_INC="$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)"
CUDA_INC="${CUDA_INC%/}"
[ -n "$CUDA_INC" ] && [ -e "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
for f in *.cu; do
  echo "nvcc -c $f"
  "$NVCC" -std=c++17 -O3 -Xcompiler -Wall -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -c "$f" -o "$TMP/${f%.cu}.o"
done
TORCH_INC="$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')"
if python -c 'import os, torch.utils.cpp_extension as c; raise SystemExit(0 if os.path.exists(os.path.join(c.include_paths()[0], "c10/cuda/CUDAStream.h")) else 1)'; then
  # CPU wheels ship c10/cuda headers without the generated cuda_cmake_macros.h; stand one in
  mkdir -p "$TMP/stub/c10/cuda/impl"
  echo "#define C10_CUDA_BUILD_SHARED_LIBS" > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for f in *.cpp; do
    echo "c++ -fsyntax-only $f"
    # shellcheck disable=SC2086
    "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Werror=return-type $TORCH_INC -I"$CUDA_INC" -idirafter "$TMP/stub" "$f"
  done
else
  echo "torch has no CUDA headers here: host glue (*.cpp) not checked"
fi
echo "CUDA sources compile"
