// CUDA implementations of torch.ops.ilf.*: input checks, dtype mapping and the current stream
// around the torch-free launchers in ilf_kernels.cu. Compiled only in CUDA builds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/ilf_kernels.cuh"
#include "ilf_checks.h"

#define ILF_CUDA_CHECK(OP, EXPR)                                                                     \
  do {                                                                                               \
    const cudaError_t err_ = (EXPR);                                                                 \
    TORCH_CHECK(err_ == cudaSuccess, "ilf::" OP ": CUDA kernel launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace ilf::cuda {
namespace {

DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "ilf: no CUDA kernel for dtype ", dtype_str(t));
  }
}

// The kernels read s / shift / scale in fp32 or in the main input's dtype; any other dtype
// (fp64, or fp16 next to bf16) is read in fp32, which is what the references compute in.
c10::ScalarType operand_dtype(c10::ScalarType t, c10::ScalarType main) {
  return (t == at::kFloat || t == main) ? t : at::kFloat;
}

at::Tensor feedback_inject_cuda(const at::Tensor& h, const at::Tensor& f, const at::Tensor& s) {
  check_feedback_inject(h, f, s);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor fc = f.contiguous();
  const at::Tensor sc = s.to(operand_dtype(s.scalar_type(), h.scalar_type())).contiguous();  // () or (D,)
  at::Tensor out = at::empty(hc.sizes(), hc.options());  // (B, T, D)
  if (out.numel() == 0) return out;
  ILF_CUDA_CHECK("feedback_inject",
                 launch_feedback_inject(out.data_ptr(), hc.data_ptr(), fc.data_ptr(), sc.data_ptr(),
                                        kernel_dtype(hc.scalar_type()), kernel_dtype(sc.scalar_type()),
                                        sc.dim() == 1, hc.size(0) * hc.size(1), hc.size(2),
                                        c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor ada_layernorm_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_ada_layernorm(x, shift, scale, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = x.size(0), d = x.size(2);
  // (B, D) views with unit stride along D; a row stride (e.g. a chunk of DiT's embedding) is kept.
  // shift and scale share one dtype in the kernel.
  const c10::ScalarType mt = shift.scalar_type() == scale.scalar_type()
                                 ? operand_dtype(shift.scalar_type(), x.scalar_type())
                                 : at::kFloat;
  const auto rows = [&](const at::Tensor& m) {
    at::Tensor t = m.to(mt).reshape({b, d});
    return (d > 1 && t.stride(1) != 1) ? t.contiguous() : t;
  };
  const at::Tensor xc = x.contiguous();
  const at::Tensor sh = rows(shift);  // (B, D)
  const at::Tensor sc = rows(scale);  // (B, D)
  at::Tensor out = at::empty(xc.sizes(), xc.options());  // (B, T, D)
  if (out.numel() == 0) return out;
  ILF_CUDA_CHECK("ada_layernorm",
                 launch_ada_layernorm(out.data_ptr(), xc.data_ptr(), sh.data_ptr(), sc.data_ptr(),
                                      kernel_dtype(xc.scalar_type()), kernel_dtype(sh.scalar_type()), b,
                                      xc.size(1), d, sh.stride(0), sc.stride(0), static_cast<float>(eps),
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace
}  // namespace ilf::cuda

TORCH_LIBRARY_IMPL(ilf, CUDA, m) {
  m.impl("feedback_inject", &ilf::cuda::feedback_inject_cuda);
  m.impl("ada_layernorm", &ilf::cuda::ada_layernorm_cuda);
}
