// Every header the kernel variants use, included by isa_*.cpp BEFORE their `#pragma GCC target`, so
// that library code (the standard library, ATen) keeps the baseline ISA in every translation unit and
// only the kernels' own functions, in a namespace per variant, are compiled for the wider ISA.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__SSE__)
#include <immintrin.h>
#include <xmmintrin.h>
#define FUSIONBLOCKS_HAVE_MXCSR 1
#endif

#include "isa.h"

// The BLAS that torch links (resolved weakly; the tile loops stand in where torch exports none).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// Whether this compiler builds the AVX2 / AVX-512 variants (GCC on x86-64: `#pragma GCC target`).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSIONBLOCKS_MULTI_ISA 1
#endif
