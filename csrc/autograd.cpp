// Autograd of the compiled attention ops (every device: the CPU kernels and the CUDA window kernel),
// registered in C++ at the Autograd key.
//
// Each forward op records one node whose backward calls the matching backward op. Only the first output
// (the attention) is differentiable; the others (log-sum-exps, the decomposed mode's intermediate,
// probabilities) are saved state: marked non-differentiable, and no zero gradient is materialized for
// them before the backward (that would fill tensors as large as the probabilities on every call). The
// backward ops record a node that refuses double backward.
//
// Why C++ and not torch.library.register_autograd: the Python route cost ~175 us per forward + backward
// on this project's CPU (AMD EPYC, torch 2.13; measured against the two ops called directly) and made
// Python objects that the garbage collector then scans; here a call costs a node allocation. The fake
// kernels stay in Python (fusionblocks/ops/cpp.py), so torch.compile traces these nodes as it traces
// torch's own.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;
using T2 = std::tuple<Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// the signatures of the ops (csrc/fusionblocks.cpp has their schemas)
using DecayFwdSig = T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double);
using DecayFullBwdSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, int64_t, int64_t, double);
using DecFwdSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double);
using DecBwdSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double);
using DecBwdProbsSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, int64_t, int64_t, double);
using WinFwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, int64_t,
                         int64_t, double);
using WinFwdTrainSig = T2(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, int64_t,
                          int64_t, double);
using WinBwdSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t,
                     int64_t, int64_t, double);
using WinBwdProbsSig = T4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, int64_t, int64_t, int64_t, int64_t, double);

variable_list as_list(const T2& t) { return {std::get<0>(t), std::get<1>(t)}; }
variable_list as_list(const T4& t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t)}; }
T2 as_t2(const variable_list& l) { return {l[0], l[1]}; }
T4 as_t4(const variable_list& l) { return {l[0], l[1], l[2], l[3]}; }

// The CPU kernel variant the forward ran in (csrc/cpu/isa.h), so that the backward runs in the same one: the
// automatic backend choice measures forward and backward of one variant, and sets it for the forward's call only.
void save_isa(AutogradContext* ctx, const Tensor& q) {
  if (q.device().is_cpu()) ctx->saved_data["isa"] = static_cast<int64_t>(fusionblocks::cpu::active_isa());
}

struct ForwardIsa {
  explicit ForwardIsa(AutogradContext* ctx) {
    const auto it = ctx->saved_data.find("isa");
    if (it != ctx->saved_data.end()) guard.emplace(static_cast<fusionblocks::cpu::Isa>(it->second.toInt()));
  }
  std::optional<fusionblocks::cpu::ThreadIsaGuard> guard;
};

// outputs[1:] are saved state, not results
void only_first_differentiable(AutogradContext* ctx, const variable_list& outputs) {
  ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
  ctx->set_materialize_grads(false);
}

Tensor grad_or_zeros(const Tensor& grad, const Tensor& like) { return grad.defined() ? grad : at::zeros_like(like); }

void save_grid(AutogradContext* ctx, int64_t h, int64_t w, double scale) {
  ctx->saved_data["h"] = h;
  ctx->saved_data["w"] = w;
  ctx->saved_data["scale"] = scale;
}

// ---- full decay: saves q, k, v, log_gamma, out, lse; the backward recomputes the probabilities

struct DecayFullBody {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& lg, int64_t h, int64_t w, double scale) {
    static const auto fwd = op<DecayFwdSig>("fusionblocks_C::decay_full_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out = as_list(fwd.call(q, k, v, lg, h, w, scale));
    only_first_differentiable(ctx, out);
    ctx->save_for_backward({q, k, v, lg, out[0], out[1]});
    save_grid(ctx, h, w, scale);
    save_isa(ctx, q);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ForwardIsa isa(ctx);
    static const auto bwd = op<DecayFullBwdSig>("fusionblocks_C::decay_full_bwd");
    const variable_list s = ctx->get_saved_variables();
    auto [dq, dk, dv, dlg] = bwd.call(grad_or_zeros(grads[0], s[4]), s[0], s[1], s[2], s[3], s[4], s[5],
                                      ctx->saved_data["h"].toInt(), ctx->saved_data["w"].toInt(),
                                      ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, dlg.to(s[3].scalar_type()), Tensor(), Tensor(), Tensor()};
  }
};

// ---- decomposed decay: saves the log-sum-exps of both passes (decay_dec_fwd) or, in the training form,
// their probabilities (decay_dec_fwd_train), which the backward then reads

template <bool kProbs>
struct DecayDecBody {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& lg, int64_t h, int64_t w, double scale) {
    static const auto fwd = op<DecFwdSig>(kProbs ? "fusionblocks_C::decay_dec_fwd_train" : "fusionblocks_C::decay_dec_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out = as_list(fwd.call(q, k, v, lg, h, w, scale));  // out, mid, row pass, column pass
    only_first_differentiable(ctx, out);
    if (kProbs) {
      ctx->save_for_backward({q, k, v, lg, out[1], out[2], out[3]});
    } else {
      ctx->save_for_backward({q, k, v, lg, out[0], out[1], out[2], out[3]});
    }
    save_grid(ctx, h, w, scale);
    save_isa(ctx, q);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ForwardIsa isa(ctx);
    const variable_list s = ctx->get_saved_variables();
    const int64_t h = ctx->saved_data["h"].toInt(), w = ctx->saved_data["w"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor g = grad_or_zeros(grads[0], s[0]);
    T4 r;
    if (kProbs) {
      static const auto bwd = op<DecBwdProbsSig>("fusionblocks_C::decay_dec_bwd_probs");
      r = bwd.call(g, s[0], s[1], s[2], s[3], s[4], s[5], s[6], h, w, scale);
    } else {
      static const auto bwd = op<DecBwdSig>("fusionblocks_C::decay_dec_bwd");
      r = bwd.call(g, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], h, w, scale);
    }
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r).to(s[3].scalar_type()),
            Tensor(), Tensor(), Tensor()};
  }
};

// ---- window attention: saves q, k, v and the bias table (window_fwd) and, in the training form, the
// windows' probabilities (window_fwd_train)

template <bool kProbs>
struct WindowBody {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& table, int64_t h, int64_t w, int64_t ws, int64_t shift,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out;
    if (kProbs) {
      static const auto fwd = op<WinFwdTrainSig>("fusionblocks_C::window_fwd_train");
      out = as_list(fwd.call(q, k, v, table, h, w, ws, shift, scale));  // attention, probabilities
      only_first_differentiable(ctx, out);
    } else {
      static const auto fwd = op<WinFwdSig>("fusionblocks_C::window_fwd");
      out = {fwd.call(q, k, v, table, h, w, ws, shift, scale)};
      ctx->set_materialize_grads(false);
    }
    const bool has_table = table.has_value() && table->defined();
    variable_list saved{q, k, v, has_table ? *table : Tensor()};
    if (kProbs) saved.push_back(out[1]);
    ctx->save_for_backward(std::move(saved));
    save_grid(ctx, h, w, scale);
    save_isa(ctx, q);
    ctx->saved_data["ws"] = ws;
    ctx->saved_data["shift"] = shift;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ForwardIsa isa(ctx);
    const variable_list s = ctx->get_saved_variables();
    const OptTensor table = s[3].defined() ? OptTensor(s[3]) : std::nullopt;
    const int64_t h = ctx->saved_data["h"].toInt(), w = ctx->saved_data["w"].toInt();
    const int64_t ws = ctx->saved_data["ws"].toInt(), shift = ctx->saved_data["shift"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor g = grad_or_zeros(grads[0], s[0]);
    T4 r;
    if (kProbs) {
      static const auto bwd = op<WinBwdProbsSig>("fusionblocks_C::window_bwd_probs");
      r = bwd.call(g, s[0], s[1], s[2], s[4], table, h, w, ws, shift, scale);
    } else {
      static const auto bwd = op<WinBwdSig>("fusionblocks_C::window_bwd");
      r = bwd.call(g, s[0], s[1], s[2], table, h, w, ws, shift, scale);
    }
    const Tensor dtable = table ? std::get<3>(r).to(s[3].scalar_type()) : Tensor();
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), dtable, Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

// ---- the backward ops: a node that refuses double backward

struct NoDoubleBackwardBody {
  template <typename F, typename... A>
  static variable_list forward(AutogradContext*, const F& run, const A&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    return as_list(run(args...));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "fusionblocks cpp/cuda attention kernels have no double backward (gradients of gradients); "
                "use backend='reference' for that");
  }
};

}  // namespace

// The node types, named after their ops: a graph shows grad_fn=<fusionblocks_C::decay_dec_fwd_train>.
namespace fusionblocks_C {
struct decay_full_fwd : Function<decay_full_fwd>, DecayFullBody {};
struct decay_dec_fwd : Function<decay_dec_fwd>, DecayDecBody<false> {};
struct decay_dec_fwd_train : Function<decay_dec_fwd_train>, DecayDecBody<true> {};
struct window_fwd : Function<window_fwd>, WindowBody<false> {};
struct window_fwd_train : Function<window_fwd_train>, WindowBody<true> {};
struct backward_op_no_double_backward : Function<backward_op_no_double_backward>, NoDoubleBackwardBody {};
}  // namespace fusionblocks_C

namespace {

// a backward op's call (handle looked up once, by its kernel) under a node refusing double backward
template <typename Sig, typename... A>
T4 backward_op(const c10::TypedOperatorHandle<Sig>& handle, const A&... args) {
  const auto run = [&handle](const A&... a) { return handle.call(a...); };
  return as_t4(fusionblocks_C::backward_op_no_double_backward::apply(run, args...));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusionblocks_C, Autograd, m) {
  m.impl("decay_full_fwd", [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, int64_t h,
                              int64_t w, double scale) {
    return as_t2(fusionblocks_C::decay_full_fwd::apply(q, k, v, lg, h, w, scale));
  });
  m.impl("decay_dec_fwd", [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, int64_t h,
                             int64_t w, double scale) {
    return as_t4(fusionblocks_C::decay_dec_fwd::apply(q, k, v, lg, h, w, scale));
  });
  m.impl("decay_dec_fwd_train", [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, int64_t h,
                                   int64_t w, double scale) {
    return as_t4(fusionblocks_C::decay_dec_fwd_train::apply(q, k, v, lg, h, w, scale));
  });
  m.impl("window_fwd", [](const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& table, int64_t h,
                          int64_t w, int64_t ws, int64_t shift, double scale) {
    return fusionblocks_C::window_fwd::apply(q, k, v, table, h, w, ws, shift, scale)[0];
  });
  m.impl("window_fwd_train", [](const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& table, int64_t h,
                                int64_t w, int64_t ws, int64_t shift, double scale) {
    return as_t2(fusionblocks_C::window_fwd_train::apply(q, k, v, table, h, w, ws, shift, scale));
  });
  m.impl("decay_full_bwd", [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg,
                              const Tensor& out, const Tensor& lse, int64_t h, int64_t w, double scale) {
    static const auto handle = op<DecayFullBwdSig>("fusionblocks_C::decay_full_bwd");
    return backward_op(handle, g, q, k, v, lg, out, lse, h, w, scale);
  });
  m.impl("decay_dec_bwd", [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg,
                             const Tensor& out, const Tensor& mid, const Tensor& lr, const Tensor& lc, int64_t h,
                             int64_t w, double scale) {
    static const auto handle = op<DecBwdSig>("fusionblocks_C::decay_dec_bwd");
    return backward_op(handle, g, q, k, v, lg, out, mid, lr, lc, h, w, scale);
  });
  m.impl("decay_dec_bwd_probs", [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& lg, const Tensor& mid, const Tensor& pr, const Tensor& pc, int64_t h,
                                   int64_t w, double scale) {
    static const auto handle = op<DecBwdProbsSig>("fusionblocks_C::decay_dec_bwd_probs");
    return backward_op(handle, g, q, k, v, lg, mid, pr, pc, h, w, scale);
  });
  m.impl("window_bwd", [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& table,
                          int64_t h, int64_t w, int64_t ws, int64_t shift, double scale) {
    static const auto handle = op<WinBwdSig>("fusionblocks_C::window_bwd");
    return backward_op(handle, g, q, k, v, table, h, w, ws, shift, scale);
  });
  m.impl("window_bwd_probs", [](const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& probs, const OptTensor& table, int64_t h, int64_t w, int64_t ws,
                                int64_t shift, double scale) {
    static const auto handle = op<WinBwdProbsSig>("fusionblocks_C::window_bwd_probs");
    return backward_op(handle, g, q, k, v, probs, table, h, w, ws, shift, scale);
  });
}
