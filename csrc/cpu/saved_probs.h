// The check every backward op that receives saved attention probabilities makes before its kernel runs:
// a (B, heads, groups, len, len) tensor for q's batch and heads (decomposed decay: one group per row or
// column; windows: one per window).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fusionblocks {
namespace cpu {

// op: the public op ("decay_attention"); name: the argument ("p_row"); layout: its shape in words.
inline void check_saved_probs(const at::Tensor& p, const at::Tensor& q, int64_t groups, int64_t len, const char* op,
                              const char* name, const char* layout) {
  TORCH_CHECK(p.dim() == 5 && p.size(0) == q.size(0) && p.size(1) == q.size(1) && p.size(2) == groups &&
                  p.size(3) == len && p.size(4) == len,
              op, "(cpp): expected ", name, " of shape ", layout, " = (", q.size(0), ", ", q.size(1), ", ", groups,
              ", ", len, ", ", len, "), got ", p.sizes());
}

}  // namespace cpu
}  // namespace fusionblocks
