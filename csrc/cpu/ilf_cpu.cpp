// CPU kernels of torch.ops.ilf.feedback_inject, ada_layernorm and gated_residual.
//
// Each op reads its input once and writes its output once; the eager references in
// ilf_runtime/ops.py make several passes (dtype casts, layer_norm, modulation). Rows are split
// across threads with at::parallel_for; inner loops are plain loops over fp32 values that the
// compiler vectorises, compiled for several x86-64 levels and picked at load time
// (target_clones), so the library stays portable without -march=native.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ilf_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ILF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ILF_CLONES
#endif
#define ILF_INLINE inline __attribute__((always_inline))

namespace ilf::cpu {
namespace {

// Storage <-> fp32 conversions as plain bit operations, so that loops using them vectorise.
struct F32 {
  using T = float;
  static ILF_INLINE float load(float v) { return v; }
  static ILF_INLINE float store(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;  // the bits of c10::BFloat16
  static ILF_INLINE float load(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  // Round to nearest even, NaN to the quiet NaN 0x7fc0, as c10::BFloat16 does.
  static ILF_INLINE uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return nan ? uint16_t{0x7fc0} : rounded;
  }
};

struct F16 {
  using T = c10::Half;
  static ILF_INLINE float load(c10::Half v) { return static_cast<float>(v); }
  static ILF_INLINE c10::Half store(float v) { return c10::Half(v); }
};

template <class L>
ILF_INLINE void inject_scalar_impl(typename L::T* __restrict__ out, const typename L::T* __restrict__ h,
                                   const typename L::T* __restrict__ f, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = L::store(L::load(h[i]) + s * L::load(f[i]));
}

template <class L>
ILF_INLINE void inject_channel_impl(typename L::T* __restrict__ out, const typename L::T* __restrict__ h,
                                    const typename L::T* __restrict__ f, const float* __restrict__ s,
                                    int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * d;
    for (int64_t c = 0; c < d; ++c) out[o + c] = L::store(L::load(h[o + c]) + s[c] * L::load(f[o + c]));
  }
}

// Sum with 16 partial sums: vectorises without -ffast-math and is more accurate than one sum.
// When STORE, also widens the row into buf.
template <class L, bool STORE>
ILF_INLINE float row_sum(const typename L::T* __restrict__ x, float* __restrict__ buf, int64_t d) {
  float acc[16] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    for (int j = 0; j < 16; ++j) {
      const float v = L::load(x[c + j]);
      if (STORE) buf[c + j] = v;
      acc[j] += v;
    }
  }
  float sum = 0.f;
  for (; c < d; ++c) {
    const float v = L::load(x[c]);
    if (STORE) buf[c] = v;
    sum += v;
  }
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

ILF_INLINE float centered_sq_sum(const float* __restrict__ v, float mean, int64_t d) {
  float acc[16] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    for (int j = 0; j < 16; ++j) {
      const float t = v[c + j] - mean;
      acc[j] += t * t;
    }
  }
  float sum = 0.f;
  for (; c < d; ++c) sum += (v[c] - mean) * (v[c] - mean);
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

// Rows [r0, r1) of x viewed as (B*T, D); buf holds one row widened to fp32, so x is read once.
// shift/scale: fp32 (B, D) contiguous.
template <class L>
ILF_INLINE void ada_ln_impl(typename L::T* __restrict__ out, const typename L::T* __restrict__ x,
                            const float* __restrict__ shift, const float* __restrict__ scale,
                            float* __restrict__ buf, int64_t r0, int64_t r1, int64_t t_len, int64_t d,
                            float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const typename L::T* xr = x + r * d;
    typename L::T* orow = out + r * d;
    const float* sh = shift + (r / t_len) * d;
    const float* sc = scale + (r / t_len) * d;
    const float mean = row_sum<L, true>(xr, buf, d) / static_cast<float>(d);
    const float var = centered_sq_sum(buf, mean, d) / static_cast<float>(d);
    const float rstd = 1.f / std::sqrt(var + eps);
    for (int64_t c = 0; c < d; ++c) orow[c] = L::store((buf[c] - mean) * rstd * (1.f + sc[c]) + sh[c]);
  }
}

// Rows [r0, r1) of (B*T, D): out = x + g * y, then (MODE 1: scalar s, 2: per-channel s) out + s * f,
// each rounded to the storage type as the unfused ops would. g: fp32 (B, D) contiguous.
template <class L, int MODE>
ILF_INLINE void gated_impl(typename L::T* __restrict__ out, const typename L::T* __restrict__ x,
                           const typename L::T* __restrict__ y, const typename L::T* __restrict__ f,
                           const float* __restrict__ g, const float* __restrict__ s, int64_t r0, int64_t r1,
                           int64_t t_len, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * d;
    const float* gr = g + (r / t_len) * d;
    for (int64_t c = 0; c < d; ++c) {
      typename L::T v = L::store(L::load(x[o + c]) + gr[c] * L::load(y[o + c]));
      if (MODE == 1) v = L::store(L::load(v) + s[0] * L::load(f[o + c]));
      if (MODE == 2) v = L::store(L::load(v) + s[c] * L::load(f[o + c]));
      out[o + c] = v;
    }
  }
}

// One multi-versioned entry point per storage type; overloads pick the type.
#define ILF_DEFINE_KERNELS(L)                                                                              \
  ILF_CLONES void inject_scalar(L::T* out, const L::T* h, const L::T* f, float s, int64_t n) {             \
    inject_scalar_impl<L>(out, h, f, s, n);                                                                \
  }                                                                                                        \
  ILF_CLONES void inject_channel(L::T* out, const L::T* h, const L::T* f, const float* s, int64_t rows,    \
                                 int64_t d) {                                                              \
    inject_channel_impl<L>(out, h, f, s, rows, d);                                                         \
  }                                                                                                        \
  ILF_CLONES void ada_ln(L::T* out, const L::T* x, const float* shift, const float* scale, float* buf,     \
                         int64_t r0, int64_t r1, int64_t t_len, int64_t d, float eps) {                    \
    ada_ln_impl<L>(out, x, shift, scale, buf, r0, r1, t_len, d, eps);                                      \
  }                                                                                                        \
  ILF_CLONES void gated(L::T* out, const L::T* x, const L::T* y, const L::T* f, const float* g, const float* s, \
                        int mode, int64_t r0, int64_t r1, int64_t t_len, int64_t d) {                      \
    if (mode == 0) gated_impl<L, 0>(out, x, y, f, g, s, r0, r1, t_len, d);                                 \
    if (mode == 1) gated_impl<L, 1>(out, x, y, f, g, s, r0, r1, t_len, d);                                 \
    if (mode == 2) gated_impl<L, 2>(out, x, y, f, g, s, r0, r1, t_len, d);                                 \
  }

ILF_DEFINE_KERNELS(F32)
ILF_DEFINE_KERNELS(BF16)
ILF_DEFINE_KERNELS(F16)
#undef ILF_DEFINE_KERNELS

template <class L>
typename L::T* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename L::T*>(t.data_ptr());
}

// Elements per parallel task; the value of at::internal::GRAIN_SIZE, whose header is heavy.
constexpr int64_t kGrain = 32768;

int64_t rows_grain(int64_t d) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)); }

template <class L>
void feedback_inject_run(const at::Tensor& out, const at::Tensor& h, const at::Tensor& f, const at::Tensor& s) {
  auto* o = ptr<L>(out);
  const auto* hp = ptr<L>(h);
  const auto* fp = ptr<L>(f);
  const float* sp = s.data_ptr<float>();
  if (s.dim() == 0) {
    const float sv = *sp;
    at::parallel_for(0, h.numel(), kGrain, [&](int64_t b, int64_t e) {
      inject_scalar(o + b, hp + b, fp + b, sv, e - b);
    });
  } else {
    const int64_t d = h.size(2);
    at::parallel_for(0, h.numel() / d, rows_grain(d), [&](int64_t b, int64_t e) {
      inject_channel(o + b * d, hp + b * d, fp + b * d, sp, e - b, d);
    });
  }
}

template <class L>
void ada_layernorm_run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& shift,
                       const at::Tensor& scale, double eps) {
  auto* o = ptr<L>(out);
  const auto* xp = ptr<L>(x);
  const float* shp = shift.data_ptr<float>();
  const float* scp = scale.data_ptr<float>();
  const int64_t t_len = x.size(1), d = x.size(2);
  at::parallel_for(0, x.size(0) * t_len, rows_grain(d), [&](int64_t b, int64_t e) {
    std::vector<float> buf(d);
    ada_ln(o, xp, shp, scp, buf.data(), b, e, t_len, d, static_cast<float>(eps));
  });
}

// f and s may be undefined (mode 0); s: fp32 () or (D,).
template <class L>
void gated_residual_run(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y, const at::Tensor& g,
                        const at::Tensor& f, const at::Tensor& s) {
  auto* o = ptr<L>(out);
  const auto* xp = ptr<L>(x);
  const auto* yp = ptr<L>(y);
  const auto* fp = f.defined() ? ptr<L>(f) : nullptr;
  const float* gp = g.data_ptr<float>();
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const int mode = !f.defined() ? 0 : (s.dim() == 0 ? 1 : 2);
  const int64_t t_len = x.size(1), d = x.size(2);
  at::parallel_for(0, x.size(0) * t_len, rows_grain(d), [&](int64_t b, int64_t e) {
    gated(o, xp, yp, fp, gp, sp, mode, b, e, t_len, d);
  });
}

// Calls FN<L>(...) with L the storage type of dtype TYPE (validated by the caller).
#define ILF_DISPATCH(TYPE, FN, ...)                                        \
  switch (TYPE) {                                                          \
    case at::kFloat: FN<F32>(__VA_ARGS__); break;                          \
    case at::kBFloat16: FN<BF16>(__VA_ARGS__); break;                      \
    case at::kHalf: FN<F16>(__VA_ARGS__); break;                           \
    default: TORCH_CHECK(false, "ilf: unsupported dtype ", dtype_str(TYPE)); \
  }

at::Tensor feedback_inject_cpu(const at::Tensor& h, const at::Tensor& f, const at::Tensor& s) {
  check_feedback_inject(h, f, s);
  const at::Tensor hc = h.contiguous();
  const at::Tensor fc = f.contiguous();
  const at::Tensor sf = s.to(at::kFloat).contiguous();  // () or (D,)
  at::Tensor out = at::empty(hc.sizes(), hc.options());  // (B, T, D)
  if (out.numel() > 0) ILF_DISPATCH(hc.scalar_type(), feedback_inject_run, out, hc, fc, sf);
  return out;
}

// (B, D) fp32 modulation rows: m (+ table), the table added once per sample rather than per token.
at::Tensor mod_rows(const at::Tensor& m, const std::optional<at::Tensor>& table, int64_t b, int64_t d) {
  at::Tensor r = m.reshape({b, d}).to(at::kFloat);
  if (table.has_value()) r = r.add(table->to(at::kFloat));  // (B, D) + (D,)
  return r.contiguous();
}

at::Tensor ada_layernorm_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                             double eps, const std::optional<at::Tensor>& shift_table,
                             const std::optional<at::Tensor>& scale_table) {
  check_ada_layernorm(x, shift, scale, eps, shift_table, scale_table);
  const int64_t b = x.size(0), d = x.size(2);
  const at::Tensor xc = x.contiguous();
  const at::Tensor shf = mod_rows(shift, shift_table, b, d);  // (B, D)
  const at::Tensor scf = mod_rows(scale, scale_table, b, d);  // (B, D)
  at::Tensor out = at::empty(xc.sizes(), xc.options());  // (B, T, D)
  if (out.numel() > 0) ILF_DISPATCH(xc.scalar_type(), ada_layernorm_run, out, xc, shf, scf, eps);
  return out;
}

at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                              const std::optional<at::Tensor>& gate_table, const std::optional<at::Tensor>& f,
                              const std::optional<at::Tensor>& s) {
  check_gated_residual(x, gate, y, gate_table, f, s);
  const at::Tensor xc = x.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor g = mod_rows(gate, gate_table, x.size(0), x.size(2));  // (B, D)
  const at::Tensor fc = f.has_value() ? f->contiguous() : at::Tensor();
  const at::Tensor sf = s.has_value() ? s->to(at::kFloat).contiguous() : at::Tensor();  // () or (D,)
  at::Tensor out = at::empty(xc.sizes(), xc.options());  // (B, T, D)
  if (out.numel() > 0) ILF_DISPATCH(xc.scalar_type(), gated_residual_run, out, xc, yc, g, fc, sf);
  return out;
}

}  // namespace
}  // namespace ilf::cpu

TORCH_LIBRARY_IMPL(ilf, CPU, m) {
  m.impl("feedback_inject", &ilf::cpu::feedback_inject_cpu);
  m.impl("ada_layernorm", &ilf::cpu::ada_layernorm_cpu);
  m.impl("gated_residual", &ilf::cpu::gated_residual_cpu);
}
