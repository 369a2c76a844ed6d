// CUDA kernels of feedback_inject and ada_layernorm (no torch headers; see ilf_kernels.cuh for the
// launcher API; gated_residual is in ilf_epilogue.cu).
//
// Both kernels read their input once and write their output once, converting to fp32 in
// registers. 16-byte vector loads and stores are used when the pointers are aligned and the
// row length allows it; otherwise the same kernels run with one element per access.
// Conversions use the explicit intrinsics only, so the file also compiles under torch's
// -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ flags.
#include <climits>
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

constexpr int kInjectThreads = 256;
constexpr int kMaxNormThreads = 256;
constexpr int64_t kMaxCachedRow = 8192;  // fp32 row cache: 32 KiB, under the 48 KiB default limit

// ---------------------------------------------------------------------------------------------
// feedback_inject: out = h + s * f

template <typename T, typename S, int VEC, bool PER_CHANNEL>
__global__ void __launch_bounds__(kInjectThreads)
    feedback_inject_kernel(T* __restrict__ out, const T* __restrict__ h, const T* __restrict__ f,
                           const S* __restrict__ s, int64_t n_packs, int64_t d) {
  using P = Pack<T, VEC>;
  const P* hp = reinterpret_cast<const P*>(h);
  const P* fp = reinterpret_cast<const P*>(f);
  P* op = reinterpret_cast<P*>(out);
  const float s0 = PER_CHANNEL ? 0.f : Cvt<S>::load(s[0]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const P hv = hp[i];
    const P fv = fp[i];
    // With PER_CHANNEL, d % VEC == 0, so a pack never straddles two rows.
    const int64_t c0 = PER_CHANNEL ? (i * VEC) % d : 0;
    P ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float sk = PER_CHANNEL ? Cvt<S>::load(s[c0 + k]) : s0;
      ov.v[k] = Cvt<T>::store(Cvt<T>::load(hv.v[k]) + sk * Cvt<T>::load(fv.v[k]));
    }
    op[i] = ov;
  }
}

template <typename T, typename S, int VEC, bool PER_CHANNEL>
void feedback_inject_go(void* out, const void* h, const void* f, const void* s, int64_t n, int64_t d,
                        cudaStream_t stream) {
  const int64_t n_packs = n / VEC;
  const int64_t blocks = (n_packs + kInjectThreads - 1) / kInjectThreads;
  feedback_inject_kernel<T, S, VEC, PER_CHANNEL>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kInjectThreads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(h), static_cast<const T*>(f), static_cast<const S*>(s),
          n_packs, d);
}

template <typename T, typename S>
cudaError_t feedback_inject_typed(void* out, const void* h, const void* f, const void* s, bool per_channel,
                                  int64_t n_rows, int64_t d, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n = n_rows * d;
  if (n == 0) return cudaSuccess;
  const bool vec = aligned16(out) && aligned16(h) && aligned16(f) && (per_channel ? d : n) % kVec == 0;
  if (per_channel) {
    vec ? feedback_inject_go<T, S, kVec, true>(out, h, f, s, n, d, stream)
        : feedback_inject_go<T, S, 1, true>(out, h, f, s, n, d, stream);
  } else {
    vec ? feedback_inject_go<T, S, kVec, false>(out, h, f, s, n, d, stream)
        : feedback_inject_go<T, S, 1, false>(out, h, f, s, n, d, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t feedback_inject_t(void* out, const void* h, const void* f, const void* s, DType s_dtype,
                              bool per_channel, int64_t n_rows, int64_t d, cudaStream_t stream) {
  if (s_dtype == DType::kFloat32)
    return feedback_inject_typed<T, float>(out, h, f, s, per_channel, n_rows, d, stream);
  if (s_dtype == dtype_of<T>()) return feedback_inject_typed<T, T>(out, h, f, s, per_channel, n_rows, d, stream);
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// ada_layernorm: out = layer_norm(x) * (1 + scale) + shift, one block per row; with the (D,) tables
// (PixArt's adaLN-single) shift + shift_table and scale + scale_table, added in fp32 in registers.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32, at most 1024.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f);
}

// Rows of d elements; each thread owns packs i = threadIdx.x + j * blockDim.x. With CACHE the
// row is kept in shared memory as fp32 (element k of pack i at cache[k * n_packs + i], so that
// consecutive threads hit consecutive banks); each thread reads back only what it wrote.
template <typename T, typename M, int VEC, bool CACHE>
__global__ void __launch_bounds__(kMaxNormThreads)
    ada_layernorm_kernel(T* __restrict__ out, const T* __restrict__ x, const M* __restrict__ shift,
                         const M* __restrict__ scale, const M* __restrict__ shift_table,
                         const M* __restrict__ scale_table, int64_t rows, int64_t t_len, int d, int64_t shift_sb,
                         int64_t scale_sb, float eps) {
  extern __shared__ float cache[];
  __shared__ float red[32];
  using P = Pack<T, VEC>;
  const int n_packs = d / VEC;
  const float fd = static_cast<float>(d);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * d);
    P* orow = reinterpret_cast<P*>(out + row * d);

    float sum = 0.f;
    for (int i = threadIdx.x; i < n_packs; i += blockDim.x) {
      const P p = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float v = Cvt<T>::load(p.v[k]);
        if constexpr (CACHE) cache[k * n_packs + i] = v;
        sum += v;
      }
    }
    const float mean = block_sum(sum, red) / fd;

    float sq = 0.f;
    for (int i = threadIdx.x; i < n_packs; i += blockDim.x) {
      P p;
      if constexpr (!CACHE) p = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v;
        if constexpr (CACHE) {
          v = cache[k * n_packs + i];
        } else {
          v = Cvt<T>::load(p.v[k]);
        }
        sq += (v - mean) * (v - mean);
      }
    }
    const float rstd = rsqrtf(block_sum(sq, red) / fd + eps);

    const int64_t b = row / t_len;
    const M* sh = shift + b * shift_sb;
    const M* sc = scale + b * scale_sb;
    for (int i = threadIdx.x; i < n_packs; i += blockDim.x) {
      P p;
      if constexpr (!CACHE) p = xr[i];
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v;
        if constexpr (CACHE) {
          v = cache[k * n_packs + i];
        } else {
          v = Cvt<T>::load(p.v[k]);
        }
        const int c = i * VEC + k;
        float shv = Cvt<M>::load(sh[c]), scv = Cvt<M>::load(sc[c]);
        if (shift_table != nullptr) shv += Cvt<M>::load(shift_table[c]);  // uniform branch
        if (scale_table != nullptr) scv += Cvt<M>::load(scale_table[c]);
        o.v[k] = Cvt<T>::store((v - mean) * rstd * (1.f + scv) + shv);
      }
      orow[i] = o;
    }
  }
}

template <typename T, typename M, int VEC>
void ada_layernorm_go(void* out, const void* x, const void* shift, const void* scale, const void* shift_table,
                      const void* scale_table, int64_t rows, int64_t t_len, int d, int64_t shift_sb,
                      int64_t scale_sb, float eps, cudaStream_t stream) {
  const int n_packs = d / VEC;
  int threads = (n_packs + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxNormThreads ? kMaxNormThreads : threads);
  const unsigned blocks = static_cast<unsigned>(rows < INT_MAX ? rows : INT_MAX);
  const bool cache = d <= kMaxCachedRow;
  const size_t smem = cache ? static_cast<size_t>(d) * sizeof(float) : 0;
  auto* o = static_cast<T*>(out);
  const auto* xp = static_cast<const T*>(x);
  const auto* shp = static_cast<const M*>(shift);
  const auto* scp = static_cast<const M*>(scale);
  const auto* sht = static_cast<const M*>(shift_table);
  const auto* sct = static_cast<const M*>(scale_table);
  if (cache) {
    ada_layernorm_kernel<T, M, VEC, true>
        <<<blocks, threads, smem, stream>>>(o, xp, shp, scp, sht, sct, rows, t_len, d, shift_sb, scale_sb, eps);
  } else {
    ada_layernorm_kernel<T, M, VEC, false>
        <<<blocks, threads, 0, stream>>>(o, xp, shp, scp, sht, sct, rows, t_len, d, shift_sb, scale_sb, eps);
  }
}

template <typename T, typename M>
cudaError_t ada_layernorm_typed(void* out, const void* x, const void* shift, const void* scale,
                                const void* shift_table, const void* scale_table, int64_t b, int64_t t, int64_t d,
                                int64_t shift_sb, int64_t scale_sb, float eps, cudaStream_t stream) {
  if (d > INT_MAX) return cudaErrorInvalidValue;
  const int64_t rows = b * t;
  if (rows == 0 || d == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const int di = static_cast<int>(d);
  if (aligned16(out) && aligned16(x) && d % kVec == 0) {
    ada_layernorm_go<T, M, kVec>(out, x, shift, scale, shift_table, scale_table, rows, t, di, shift_sb, scale_sb,
                                 eps, stream);
  } else {
    ada_layernorm_go<T, M, 1>(out, x, shift, scale, shift_table, scale_table, rows, t, di, shift_sb, scale_sb, eps,
                              stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t ada_layernorm_t(void* out, const void* x, const void* shift, const void* scale, const void* shift_table,
                            const void* scale_table, DType mod_dtype, int64_t b, int64_t t, int64_t d,
                            int64_t shift_sb, int64_t scale_sb, float eps, cudaStream_t stream) {
  if (mod_dtype == DType::kFloat32)
    return ada_layernorm_typed<T, float>(out, x, shift, scale, shift_table, scale_table, b, t, d, shift_sb,
                                         scale_sb, eps, stream);
  if (mod_dtype == dtype_of<T>())
    return ada_layernorm_typed<T, T>(out, x, shift, scale, shift_table, scale_table, b, t, d, shift_sb, scale_sb,
                                     eps, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_feedback_inject(void* out, const void* h, const void* f, const void* s, DType dtype,
                                   DType s_dtype, bool s_per_channel, int64_t n_rows, int64_t d,
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return feedback_inject_t<float>(out, h, f, s, s_dtype, s_per_channel, n_rows, d, stream);
    case DType::kFloat16:
      return feedback_inject_t<__half>(out, h, f, s, s_dtype, s_per_channel, n_rows, d, stream);
    case DType::kBFloat16:
      return feedback_inject_t<__nv_bfloat16>(out, h, f, s, s_dtype, s_per_channel, n_rows, d, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_ada_layernorm(void* out, const void* x, const void* shift, const void* scale,
                                 const void* shift_table, const void* scale_table, DType dtype, DType mod_dtype,
                                 int64_t b, int64_t t, int64_t d, int64_t shift_stride_b, int64_t scale_stride_b,
                                 float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return ada_layernorm_t<float>(out, x, shift, scale, shift_table, scale_table, mod_dtype, b, t, d,
                                    shift_stride_b, scale_stride_b, eps, stream);
    case DType::kFloat16:
      return ada_layernorm_t<__half>(out, x, shift, scale, shift_table, scale_table, mod_dtype, b, t, d,
                                     shift_stride_b, scale_stride_b, eps, stream);
    case DType::kBFloat16:
      return ada_layernorm_t<__nv_bfloat16>(out, x, shift, scale, shift_table, scale_table, mod_dtype, b, t, d,
                                            shift_stride_b, scale_stride_b, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ilf::cuda
