// CUDA kernel of gated_residual (no torch headers; launcher API in ilf_kernels.cuh).
//
// One pass: reads x, y (and f) once, writes out once; the gate (and table, and per-channel s) rows
// are small and stay in L1/L2. 16-byte packs when every pointer is aligned and D is a multiple of
// the pack (a pack then never straddles two rows, so its gate row is one).
#include <cstdint>

#include "ilf_device.cuh"
#include "ilf_kernels.cuh"

namespace ilf::cuda {
namespace {

using detail::aligned16;
using detail::Cvt;
using detail::dtype_of;
using detail::kMaxBlocks;
using detail::Pack;

constexpr int kThreads = 256;

// MODE 0: out = x + g * y; 1: then + s[0] * f; 2: then + s[c] * f. Each result rounded to T, as the
// unfused ops round it.
template <typename T, typename M, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads)
    gated_residual_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,
                          const M* __restrict__ gate, const M* __restrict__ gate_table, const T* __restrict__ f,
                          const M* __restrict__ s, int64_t n_packs, int64_t row_elems, int64_t d,
                          int64_t gate_sb) {
  using P = Pack<T, VEC>;
  const P* xp = reinterpret_cast<const P*>(x);
  const P* yp = reinterpret_cast<const P*>(y);
  const P* fp = reinterpret_cast<const P*>(f);
  P* op = reinterpret_cast<P*>(out);
  const float s0 = MODE == 1 ? Cvt<M>::load(s[0]) : 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const int64_t e = i * VEC;
    const M* g = gate + (e / row_elems) * gate_sb;  // row_elems = T * D: one gate row per sample
    const int64_t c0 = e % d;
    const P xv = xp[i];
    const P yv = yp[i];
    P fv;
    if constexpr (MODE != 0) fv = fp[i];
    P ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float gk = Cvt<M>::load(g[c0 + k]);
      if (gate_table != nullptr) gk += Cvt<M>::load(gate_table[c0 + k]);  // uniform branch
      T v = Cvt<T>::store(Cvt<T>::load(xv.v[k]) + gk * Cvt<T>::load(yv.v[k]));
      if constexpr (MODE != 0) {
        const float sk = MODE == 1 ? s0 : Cvt<M>::load(s[c0 + k]);
        v = Cvt<T>::store(Cvt<T>::load(v) + sk * Cvt<T>::load(fv.v[k]));
      }
      ov.v[k] = v;
    }
    op[i] = ov;
  }
}

template <typename T, typename M, int VEC, int MODE>
void gated_residual_go(void* out, const void* x, const void* y, const void* gate, const void* gate_table,
                       const void* f, const void* s, int64_t n, int64_t row_elems, int64_t d, int64_t gate_sb,
                       cudaStream_t stream) {
  const int64_t n_packs = n / VEC;
  const int64_t blocks = (n_packs + kThreads - 1) / kThreads;
  gated_residual_kernel<T, M, VEC, MODE>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const M*>(gate),
          static_cast<const M*>(gate_table), static_cast<const T*>(f), static_cast<const M*>(s), n_packs,
          row_elems, d, gate_sb);
}

template <typename T, typename M, int VEC>
void gated_residual_mode(int mode, void* out, const void* x, const void* y, const void* gate,
                         const void* gate_table, const void* f, const void* s, int64_t n, int64_t row_elems,
                         int64_t d, int64_t gate_sb, cudaStream_t stream) {
  if (mode == 0) gated_residual_go<T, M, VEC, 0>(out, x, y, gate, gate_table, f, s, n, row_elems, d, gate_sb, stream);
  if (mode == 1) gated_residual_go<T, M, VEC, 1>(out, x, y, gate, gate_table, f, s, n, row_elems, d, gate_sb, stream);
  if (mode == 2) gated_residual_go<T, M, VEC, 2>(out, x, y, gate, gate_table, f, s, n, row_elems, d, gate_sb, stream);
}

template <typename T, typename M>
cudaError_t gated_residual_typed(void* out, const void* x, const void* y, const void* gate, const void* gate_table,
                                 const void* f, const void* s, bool s_per_channel, int64_t b, int64_t t, int64_t d,
                                 int64_t gate_sb, cudaStream_t stream) {
  const int64_t n = b * t * d;
  if (n == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const int mode = f == nullptr ? 0 : (s_per_channel ? 2 : 1);
  const bool vec = d % kVec == 0 && aligned16(out) && aligned16(x) && aligned16(y) && (f == nullptr || aligned16(f));
  if (vec) {
    gated_residual_mode<T, M, kVec>(mode, out, x, y, gate, gate_table, f, s, n, t * d, d, gate_sb, stream);
  } else {
    gated_residual_mode<T, M, 1>(mode, out, x, y, gate, gate_table, f, s, n, t * d, d, gate_sb, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t gated_residual_t(void* out, const void* x, const void* y, const void* gate, const void* gate_table,
                             const void* f, const void* s, bool s_per_channel, DType mod_dtype, int64_t b,
                             int64_t t, int64_t d, int64_t gate_sb, cudaStream_t stream) {
  if (mod_dtype == DType::kFloat32)
    return gated_residual_typed<T, float>(out, x, y, gate, gate_table, f, s, s_per_channel, b, t, d, gate_sb,
                                          stream);
  if (mod_dtype == dtype_of<T>())
    return gated_residual_typed<T, T>(out, x, y, gate, gate_table, f, s, s_per_channel, b, t, d, gate_sb, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_gated_residual(void* out, const void* x, const void* y, const void* gate, const void* gate_table,
                                  const void* f, const void* s, bool s_per_channel, DType dtype, DType mod_dtype,
                                  int64_t b, int64_t t, int64_t d, int64_t gate_stride_b, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return gated_residual_t<float>(out, x, y, gate, gate_table, f, s, s_per_channel, mod_dtype, b, t, d,
                                     gate_stride_b, stream);
    case DType::kFloat16:
      return gated_residual_t<__half>(out, x, y, gate, gate_table, f, s, s_per_channel, mod_dtype, b, t, d,
                                      gate_stride_b, stream);
    case DType::kBFloat16:
      return gated_residual_t<__nv_bfloat16>(out, x, y, gate, gate_table, f, s, s_per_channel, mod_dtype, b, t, d,
                                             gate_stride_b, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ilf::cuda
