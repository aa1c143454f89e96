// The table of entry points of one variant (included last by isa_*.cpp).
#pragma once

namespace fusionblocks {
namespace cpu {
namespace FUSIONBLOCKS_ISA {

constexpr Kernels kKernels = {FUSIONBLOCKS_ISA_NAME, &full_fwd, &full_bwd, &dec_fwd, &dec_bwd, &window_fwd, &window_bwd,
                             &dec_fwd_train, &dec_bwd_probs, &window_fwd_train, &window_bwd_probs};

}  // namespace FUSIONBLOCKS_ISA
}  // namespace cpu
}  // namespace fusionblocks
