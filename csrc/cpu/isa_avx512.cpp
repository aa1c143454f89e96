// The AVX-512 variant of the CPU kernels (avx512f): 16-float vectors, blocking for 32 zmm registers.
// Compiled by GCC for x86-64 (`#pragma GCC target` after every library header, so only the kernels use
// the ISA) and run only where the CPU has it (isa.cpp checks).
#include "variant_prelude.h"

#ifdef FUSIONBLOCKS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f")
#define FUSIONBLOCKS_ISA isa_avx512
#define FUSIONBLOCKS_ISA_NAME "avx512"
#define FUSIONBLOCKS_ISA_AVX512 1
#define FUSIONBLOCKS_VEC_BYTES 64
#define FUSIONBLOCKS_VEC_REGS 32
#include "decay_kernels.h"
#include "window_kernels.h"
#include "kernel_table.h"
#pragma GCC pop_options
#endif

namespace fusionblocks {
namespace cpu {
#ifdef FUSIONBLOCKS_MULTI_ISA
const Kernels* kernels_avx512() { return &isa_avx512::kKernels; }
#else
const Kernels* kernels_avx512() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace fusionblocks
