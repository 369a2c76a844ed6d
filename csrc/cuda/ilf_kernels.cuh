// Launchers of the CUDA kernels of the `ilf` ops. Plain CUDA C++ with raw pointers: this header
// and ilf_kernels.cu include no torch header, so they compile with bare nvcc (see
// tests/test_nvcc_compile.py); csrc/cuda/ilf_cuda.cpp binds them to torch.ops.ilf.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ilf::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out = h + s * f, computed in fp32.
//   out, h, f: n_rows * d contiguous elements of `dtype`.
//   s: device pointer to one value (s_per_channel false) or d contiguous values, of `s_dtype`,
//      which must be kFloat32 or `dtype`. Read on the device: no host sync, graph-capturable.
// Returns cudaErrorInvalidValue for an unsupported dtype pair, else the launch status.
cudaError_t launch_feedback_inject(void* out, const void* h, const void* f, const void* s, DType dtype,
                                   DType s_dtype, bool s_per_channel, int64_t n_rows, int64_t d,
                                   cudaStream_t stream);

// out = layer_norm(x) * (1 + scale) + shift, statistics in fp32.
//   out, x: b * t * d contiguous elements of `dtype`.
//   shift, scale: row b starts at shift + b * shift_stride_b (scale likewise), d contiguous values
//      of `mod_dtype`, which must be kFloat32 or `dtype`.
cudaError_t launch_ada_layernorm(void* out, const void* x, const void* shift, const void* scale, DType dtype,
                                 DType mod_dtype, int64_t b, int64_t t, int64_t d, int64_t shift_stride_b,
                                 int64_t scale_stride_b, float eps, cudaStream_t stream);

}  // namespace ilf::cuda
