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

// out = layer_norm(x) * (1 + scale') + shift', statistics in fp32, where shift' = shift (+ shift_table)
// and scale' = scale (+ scale_table).
//   out, x: b * t * d contiguous elements of `dtype`.
//   shift, scale: row b starts at shift + b * shift_stride_b (scale likewise), d contiguous values
//      of `mod_dtype`, which must be kFloat32 or `dtype`.
//   shift_table, scale_table: nullptr or d contiguous values of `mod_dtype` (PixArt's adaLN-single).
cudaError_t launch_ada_layernorm(void* out, const void* x, const void* shift, const void* scale,
                                 const void* shift_table, const void* scale_table, DType dtype, DType mod_dtype,
                                 int64_t b, int64_t t, int64_t d, int64_t shift_stride_b, int64_t scale_stride_b,
                                 float eps, cudaStream_t stream);

// The gated residual epilogue, optionally fused with the next loop block's feedback injection:
//   out = round(x + g * y), g = gate (+ gate_table); with f: out = round(out + s * f).
//   out, x, y, f: b * t * d contiguous elements of `dtype` (f nullptr: no injection).
//   gate: row b starts at gate + b * gate_stride_b, d contiguous values of `mod_dtype` (kFloat32 or
//      `dtype`); gate_table: nullptr or d values of `mod_dtype`.
//   s: one value (s_per_channel false) or d values of `mod_dtype`; read on the device.
cudaError_t launch_gated_residual(void* out, const void* x, const void* y, const void* gate, const void* gate_table,
                                  const void* f, const void* s, bool s_per_channel, DType dtype, DType mod_dtype,
                                  int64_t b, int64_t t, int64_t d, int64_t gate_stride_b, cudaStream_t stream);

}  // namespace ilf::cuda
