// Instruction-set variants of the CPU kernels and the run-time choice between them.
//
// csrc/cpu/isa_{default,avx2,avx512}.cpp each compile the same kernels (decay_kernels.h,
// window_kernels.h on top of attention_tile.h) for one ISA, in a namespace of their own, and hand
// out a table of entry points; the ops in decay.cpp and window.cpp check their inputs and call the
// table of the active variant. The active variant is, in this order: the one forced with
// set_active_isa() (fusionblocks.ops.cpp.set_isa), the one named by the environment variable
// FUSIONBLOCKS_CPU_ISA (read at every call: auto, avx512, avx2 or default), the one chosen for the
// calling thread with set_thread_isa() (the automatic backend choice's measured variant for a call,
// fusionblocks.ops.cpp.call_isa), or the best one this CPU runs. Asking for a variant the CPU (or this
// build) cannot run is an error, never a silent fallback.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fusionblocks {
namespace cpu {

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kNumIsas = 3;

using at::Tensor;

// Entry points of one variant; arguments are those of the TORCH_LIBRARY schemas, already checked.
struct Kernels {
  const char* name;
  std::tuple<Tensor, Tensor> (*decay_full_fwd)(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& lg, int64_t h, int64_t w, double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*decay_full_bwd)(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                               const Tensor& v, const Tensor& lg, const Tensor& out,
                                                               const Tensor& lse, int64_t h, int64_t w,
                                                               double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*decay_dec_fwd)(const Tensor& q, const Tensor& k, const Tensor& v,
                                                              const Tensor& lg, int64_t h, int64_t w, double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*decay_dec_bwd)(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                              const Tensor& v, const Tensor& lg, const Tensor& mid,
                                                              const Tensor& lse_row, const Tensor& lse_col, int64_t h,
                                                              int64_t w, double scale);
  Tensor (*window_fwd)(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& table,
                       int64_t h, int64_t w, int64_t ws, int64_t shift, double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*window_bwd)(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                           const Tensor& v, const std::optional<Tensor>& table,
                                                           int64_t h, int64_t w, int64_t ws, int64_t shift,
                                                           double scale);
  // The training forms: the forward also saves the softmax probabilities, which the backward reads
  // instead of recomputing them (one tile product and the exponentials fewer).
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*decay_dec_fwd_train)(const Tensor& q, const Tensor& k,
                                                                    const Tensor& v, const Tensor& lg, int64_t h,
                                                                    int64_t w, double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*decay_dec_bwd_probs)(const Tensor& grad, const Tensor& q,
                                                                    const Tensor& k, const Tensor& v,
                                                                    const Tensor& lg, const Tensor& mid,
                                                                    const Tensor& p_row, const Tensor& p_col,
                                                                    int64_t h, int64_t w, double scale);
  std::tuple<Tensor, Tensor> (*window_fwd_train)(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& table, int64_t h, int64_t w, int64_t ws,
                                                 int64_t shift, double scale);
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*window_bwd_probs)(const Tensor& grad, const Tensor& q,
                                                                 const Tensor& k, const Tensor& v,
                                                                 const Tensor& probs,
                                                                 const std::optional<Tensor>& table, int64_t h,
                                                                 int64_t w, int64_t ws, int64_t shift, double scale);
};

// The table of each variant; nullptr where this build has none (non-x86 targets, compilers without
// GCC's `#pragma GCC target`).
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

const char* isa_name(Isa isa);
// Empty when this machine and this build run `isa`; otherwise why not.
std::string isa_unsupported_reason(Isa isa);
// Names of the variants this machine runs, best first ("default" always among them).
std::vector<std::string> supported_isas();
// Parses a variant name (case-insensitive); errors name the accepted values.
Isa parse_isa(const std::string& name);
// Forces a variant (checked to be supported) or, with std::nullopt, goes back to the automatic choice.
void set_active_isa(std::optional<Isa> isa);
// The calling thread's variant (checked to be supported), below the forced one and the environment
// variable; std::nullopt clears it. Returns the thread's previous one.
std::optional<Isa> set_thread_isa(std::optional<Isa> isa);
// The variant the next kernel call uses (errors when FUSIONBLOCKS_CPU_ISA asks for one this CPU lacks).
Isa active_isa();
const Kernels& active_kernels();

// Runs a scope in `isa` as the calling thread's variant (the autograd nodes' backward uses the variant
// its forward ran in), restoring the thread's previous one.
class ThreadIsaGuard {
 public:
  explicit ThreadIsaGuard(Isa isa) : prev_(set_thread_isa(isa)) {}
  ~ThreadIsaGuard() { set_thread_isa(prev_); }
  ThreadIsaGuard(const ThreadIsaGuard&) = delete;
  ThreadIsaGuard& operator=(const ThreadIsaGuard&) = delete;

 private:
  std::optional<Isa> prev_;
};

}  // namespace cpu
}  // namespace fusionblocks
