// The AVX2 variant of the CPU kernels (AVX2 + FMA): 8-float vectors, blocking for 16 ymm registers.
// Compiled by GCC for x86-64 (`#pragma GCC target` after every library header, so only the kernels use
// the ISA) and run only where the CPU has it (isa.cpp checks).
#include "variant_prelude.h"

#ifdef FUSIONBLOCKS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FUSIONBLOCKS_ISA isa_avx2
#define FUSIONBLOCKS_ISA_NAME "avx2"
#define FUSIONBLOCKS_ISA_AVX2 1
#define FUSIONBLOCKS_VEC_BYTES 32
#define FUSIONBLOCKS_VEC_REGS 16
#include "decay_kernels.h"
#include "window_kernels.h"
#include "kernel_table.h"
#pragma GCC pop_options
#endif

namespace fusionblocks {
namespace cpu {
#ifdef FUSIONBLOCKS_MULTI_ISA
const Kernels* kernels_avx2() { return &isa_avx2::kKernels; }
#else
const Kernels* kernels_avx2() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace fusionblocks
