// The portable variant of the CPU kernels: the compiler's baseline ISA (SSE2 on x86-64, NEON on aarch64),
// 4-float vectors and the register blocking of 16 vector registers. Built everywhere.
#include "variant_prelude.h"

#define FUSIONBLOCKS_ISA isa_default
#define FUSIONBLOCKS_ISA_NAME "default"
#define FUSIONBLOCKS_VEC_BYTES 16
#define FUSIONBLOCKS_VEC_REGS 16
#include "decay_kernels.h"
#include "window_kernels.h"
#include "kernel_table.h"

namespace fusionblocks {
namespace cpu {
const Kernels* kernels_default() { return &isa_default::kKernels; }
}  // namespace cpu
}  // namespace fusionblocks
