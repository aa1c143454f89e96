// The run-time choice of the kernel variant (see isa.h).
#include "isa.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>

namespace fusionblocks {
namespace cpu {
namespace {

// -1: automatic (environment, then the thread's variant, then the best one); otherwise the forced Isa
std::atomic<int> forced{-1};
// -1: none; otherwise the Isa chosen for this thread's calls (set_thread_isa)
thread_local int thread_choice = -1;

const Kernels* table(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return kernels_avx512();
    case Isa::Avx2: return kernels_avx2();
    default: return kernels_default();
  }
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case Isa::Avx512: return __builtin_cpu_supports("avx512f");
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == Isa::Default;
#endif
}

const char* cpu_feature(Isa isa) { return isa == Isa::Avx512 ? "avx512f" : "avx2 and fma"; }

Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2})
    if (isa_unsupported_reason(isa).empty()) return isa;
  return Isa::Default;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

std::string isa_unsupported_reason(Isa isa) {
  if (table(isa) == nullptr)
    return std::string("this build of fusionblocks._C has no ") + isa_name(isa) +
           " kernels (they are compiled by GCC for x86-64 only)";
  if (!cpu_has(isa)) return std::string("this CPU lacks ") + cpu_feature(isa);
  return "";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Default})
    if (isa_unsupported_reason(isa).empty()) names.emplace_back(isa_name(isa));
  return names;
}

namespace {
std::string lowered(const std::string& name) {
  std::string s(name);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// "auto" in any case, like the variant names (and Python's set_isa)
bool is_auto(const std::string& name) { return lowered(name) == "auto"; }

bool lookup_isa(const std::string& name, Isa* out) {
  const std::string s = lowered(name);
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Default})
    if (s == isa_name(isa)) {
      *out = isa;
      return true;
    }
  return false;
}
}  // namespace

Isa parse_isa(const std::string& name) {
  Isa isa = Isa::Default;
  TORCH_CHECK_VALUE(lookup_isa(name, &isa), "fusionblocks cpp kernels: unknown CPU ISA variant '", name,
                    "'; expected one of avx512, avx2, default (or auto)");
  return isa;
}

namespace {
void check_supported(Isa isa) {
  const std::string why = isa_unsupported_reason(isa);
  TORCH_CHECK(why.empty(), "fusionblocks cpp kernels: cannot use the ", isa_name(isa), " variant: ", why,
              "; this machine runs: ", c10::Join(", ", supported_isas()));
}
}  // namespace

void set_active_isa(std::optional<Isa> isa) {
  if (isa.has_value()) check_supported(*isa);
  forced.store(isa.has_value() ? static_cast<int>(*isa) : -1);
}

std::optional<Isa> set_thread_isa(std::optional<Isa> isa) {
  if (isa.has_value()) check_supported(*isa);
  const int prev = thread_choice;
  thread_choice = isa.has_value() ? static_cast<int>(*isa) : -1;
  return prev >= 0 ? std::optional<Isa>(static_cast<Isa>(prev)) : std::nullopt;
}

Isa active_isa() {
  const int f = forced.load(std::memory_order_relaxed);
  if (f >= 0) return static_cast<Isa>(f);
  const char* env = std::getenv("FUSIONBLOCKS_CPU_ISA");
  if (env == nullptr || *env == '\0' || is_auto(env))
    return thread_choice >= 0 ? static_cast<Isa>(thread_choice) : best_isa();
  Isa isa = Isa::Default;
  TORCH_CHECK_VALUE(lookup_isa(env, &isa), "fusionblocks cpp kernels: FUSIONBLOCKS_CPU_ISA=", env,
                    " is not a CPU ISA variant; expected one of auto, avx512, avx2, default");
  const std::string why = isa_unsupported_reason(isa);
  TORCH_CHECK(why.empty(), "fusionblocks cpp kernels: FUSIONBLOCKS_CPU_ISA=", env, " asks for the ", isa_name(isa),
              " variant, but ", why, "; this machine runs: ", c10::Join(", ", supported_isas()),
              " (unset it or use auto for the best one)");
  return isa;
}

const Kernels& active_kernels() { return *table(active_isa()); }

}  // namespace cpu
}  // namespace fusionblocks
