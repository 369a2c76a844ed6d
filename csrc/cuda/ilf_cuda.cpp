// CUDA implementations of torch.ops.ilf.*: input checks, dtype mapping and the current stream
// around the torch-free launchers in ilf_kernels.cu. Compiled only in CUDA builds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>

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

// One dtype for several modulation operands that a kernel reads with one type: `main` when all of
// them have it, else fp32 (exact for bf16 / fp16, and what the references compute in).
c10::ScalarType shared_operand_dtype(std::initializer_list<const at::Tensor*> ts, c10::ScalarType main) {
  for (const at::Tensor* t : ts)
    if (t->defined() && t->scalar_type() != main) return at::kFloat;
  return main;
}

// (B, D) view with unit stride along D in dtype `mt`; a row stride (e.g. a chunk of DiT's
// embedding) is kept, so no copy is made in the common case.
at::Tensor mod_rows(const at::Tensor& m, c10::ScalarType mt, int64_t b, int64_t d) {
  at::Tensor t = m.to(mt).reshape({b, d});
  return (d > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

at::Tensor opt_to(const std::optional<at::Tensor>& t, c10::ScalarType mt) {
  return t.has_value() ? t->to(mt).contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

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

at::Tensor ada_layernorm_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                              const std::optional<at::Tensor>& shift_table,
                              const std::optional<at::Tensor>& scale_table) {
  check_ada_layernorm(x, shift, scale, eps, shift_table, scale_table);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = x.size(0), d = x.size(2);
  const at::Tensor none;
  const c10::ScalarType mt = shared_operand_dtype(
      {&shift, &scale, shift_table ? &*shift_table : &none, scale_table ? &*scale_table : &none}, x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const at::Tensor sh = mod_rows(shift, mt, b, d);  // (B, D)
  const at::Tensor sc = mod_rows(scale, mt, b, d);  // (B, D)
  const at::Tensor sht = opt_to(shift_table, mt);  // (D,) or undefined
  const at::Tensor sct = opt_to(scale_table, mt);  // (D,) or undefined
  at::Tensor out = at::empty(xc.sizes(), xc.options());  // (B, T, D)
  if (out.numel() == 0) return out;
  ILF_CUDA_CHECK("ada_layernorm",
                 launch_ada_layernorm(out.data_ptr(), xc.data_ptr(), sh.data_ptr(), sc.data_ptr(), ptr_or_null(sht),
                                      ptr_or_null(sct), kernel_dtype(xc.scalar_type()), kernel_dtype(mt), b,
                                      xc.size(1), d, sh.stride(0), sc.stride(0), static_cast<float>(eps),
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor gated_residual_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                               const std::optional<at::Tensor>& gate_table, const std::optional<at::Tensor>& f,
                               const std::optional<at::Tensor>& s) {
  check_gated_residual(x, gate, y, gate_table, f, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = x.size(0), d = x.size(2);
  const at::Tensor none;
  const c10::ScalarType mt = shared_operand_dtype(
      {&gate, gate_table ? &*gate_table : &none, s ? &*s : &none}, x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor g = mod_rows(gate, mt, b, d);  // (B, D)
  const at::Tensor gt = opt_to(gate_table, mt);  // (D,) or undefined
  const at::Tensor fc = f.has_value() ? f->contiguous() : at::Tensor();  // (B, T, D) or undefined
  const at::Tensor sc = opt_to(s, mt);  // () or (D,) or undefined
  at::Tensor out = at::empty(xc.sizes(), xc.options());  // (B, T, D)
  if (out.numel() == 0) return out;
  ILF_CUDA_CHECK("gated_residual",
                 launch_gated_residual(out.data_ptr(), xc.data_ptr(), yc.data_ptr(), g.data_ptr(), ptr_or_null(gt),
                                       ptr_or_null(fc), ptr_or_null(sc), sc.defined() && sc.dim() == 1,
                                       kernel_dtype(xc.scalar_type()), kernel_dtype(mt), b, xc.size(1), d,
                                       g.stride(0), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace
}  // namespace ilf::cuda

TORCH_LIBRARY_IMPL(ilf, CUDA, m) {
  m.impl("feedback_inject", &ilf::cuda::feedback_inject_cuda);
  m.impl("ada_layernorm", &ilf::cuda::ada_layernorm_cuda);
  m.impl("gated_residual", &ilf::cuda::gated_residual_cuda);
}
