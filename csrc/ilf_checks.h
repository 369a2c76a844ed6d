// Input validation shared by the CPU and CUDA implementations, so that both devices (and the
// Python references in ilf_runtime/ops.py) reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>

namespace ilf {

// Python-style shape: "()", "(128,)", "(2, 3, 4)".
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

// Python-style dtype name: "float32", "bfloat16", "int64".
inline std::string dtype_str(c10::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

inline bool kernel_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace ilf

// ILF_CHECK(op, cond, ...): TORCH_CHECK whose message starts with the op name.
#define ILF_CHECK(OP, COND, ...) TORCH_CHECK((COND), "ilf::" OP ": ", __VA_ARGS__)

// The tensor's shape must equal EXPECTED (an IntArrayRef); DESC names the symbolic shape.
#define ILF_CHECK_SHAPE(OP, T, DESC, EXPECTED)                                                \
  ILF_CHECK(OP, (T).sizes() == c10::IntArrayRef(EXPECTED), #T " must have shape " DESC "=", \
            ::ilf::shape_str(EXPECTED), ", got ", ::ilf::shape_str((T).sizes()))

#define ILF_CHECK_KERNEL_DTYPE(OP, T)                                                    \
  ILF_CHECK(OP, ::ilf::kernel_dtype((T).scalar_type()),                                 \
            #T " must be float32, bfloat16 or float16, got ", ::ilf::dtype_str((T).scalar_type()))

#define ILF_CHECK_FLOATING(OP, T)                                                        \
  ILF_CHECK(OP, c10::isFloatingType((T).scalar_type()), #T " must be a floating-point tensor, got ", \
            ::ilf::dtype_str((T).scalar_type()))

#define ILF_CHECK_SAME_DEVICE(OP, T, REF)                                                \
  ILF_CHECK(OP, (T).device() == (REF).device(), #T " must be on the device of " #REF " (", \
            (REF).device(), "), got ", (T).device())

namespace ilf {

inline void check_feedback_inject(const at::Tensor& h, const at::Tensor& f, const at::Tensor& s) {
  ILF_CHECK("feedback_inject", h.dim() == 3, "h must have shape (B, T, D), got ", shape_str(h.sizes()));
  ILF_CHECK_SHAPE("feedback_inject", f, "(B, T, D)", h.sizes());
  ILF_CHECK_KERNEL_DTYPE("feedback_inject", h);
  ILF_CHECK("feedback_inject", f.scalar_type() == h.scalar_type(), "f must have the dtype of h (",
            dtype_str(h.scalar_type()), "), got ", dtype_str(f.scalar_type()));
  ILF_CHECK_FLOATING("feedback_inject", s);
  const int64_t d = h.size(2);
  ILF_CHECK("feedback_inject", s.dim() == 0 || (s.dim() == 1 && s.size(0) == d),
            "s must be 0-dim or shape (D,)=(", d, ",), got ", shape_str(s.sizes()));
  ILF_CHECK_SAME_DEVICE("feedback_inject", f, h);
  ILF_CHECK_SAME_DEVICE("feedback_inject", s, h);
}

// shift/scale: (B, D) or (B, 1, D).
inline void check_modulation(const char* name, const at::Tensor& m, int64_t b, int64_t d) {
  const bool ok = (m.dim() == 2 && m.size(0) == b && m.size(1) == d) ||
                  (m.dim() == 3 && m.size(0) == b && m.size(1) == 1 && m.size(2) == d);
  TORCH_CHECK(ok, "ilf::ada_layernorm: ", name, " must have shape (B, D)=(", b, ", ", d,
              ") or (B, 1, D)=(", b, ", 1, ", d, "), got ", shape_str(m.sizes()));
  TORCH_CHECK(c10::isFloatingType(m.scalar_type()), "ilf::ada_layernorm: ", name,
              " must be a floating-point tensor, got ", dtype_str(m.scalar_type()));
}

// A modulation table row: (D,), floating, on x's device.
inline void check_table(const char* op, const char* name, const std::optional<at::Tensor>& t,
                        const at::Tensor& x) {
  if (!t.has_value()) return;
  const int64_t d = x.size(2);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == d, "ilf::", op, ": ", name, " must have shape (D,)=(", d,
              ",), got ", shape_str(t->sizes()));
  TORCH_CHECK(c10::isFloatingType(t->scalar_type()), "ilf::", op, ": ", name,
              " must be a floating-point tensor, got ", dtype_str(t->scalar_type()));
  TORCH_CHECK(t->device() == x.device(), "ilf::", op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", t->device());
}

inline void check_ada_layernorm(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                double eps, const std::optional<at::Tensor>& shift_table,
                                const std::optional<at::Tensor>& scale_table) {
  ILF_CHECK("ada_layernorm", x.dim() == 3, "x must have shape (B, T, D), got ", shape_str(x.sizes()));
  ILF_CHECK_KERNEL_DTYPE("ada_layernorm", x);
  check_modulation("shift", shift, x.size(0), x.size(2));
  check_modulation("scale", scale, x.size(0), x.size(2));
  ILF_CHECK("ada_layernorm", eps >= 0.0, "eps must be >= 0, got ", eps);
  ILF_CHECK_SAME_DEVICE("ada_layernorm", shift, x);
  ILF_CHECK_SAME_DEVICE("ada_layernorm", scale, x);
  check_table("ada_layernorm", "shift_table", shift_table, x);
  check_table("ada_layernorm", "scale_table", scale_table, x);
}

inline void check_gated_residual(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y,
                                 const std::optional<at::Tensor>& gate_table, const std::optional<at::Tensor>& f,
                                 const std::optional<at::Tensor>& s) {
  const char* op = "gated_residual";
  ILF_CHECK("gated_residual", x.dim() == 3, "x must have shape (B, T, D), got ", shape_str(x.sizes()));
  ILF_CHECK_KERNEL_DTYPE("gated_residual", x);
  ILF_CHECK_SHAPE("gated_residual", y, "(B, T, D)", x.sizes());
  ILF_CHECK("gated_residual", y.scalar_type() == x.scalar_type(), "y must have the dtype of x (",
            dtype_str(x.scalar_type()), "), got ", dtype_str(y.scalar_type()));
  const int64_t b = x.size(0), d = x.size(2);
  const bool ok = (gate.dim() == 2 && gate.size(0) == b && gate.size(1) == d) ||
                  (gate.dim() == 3 && gate.size(0) == b && gate.size(1) == 1 && gate.size(2) == d);
  ILF_CHECK("gated_residual", ok, "gate must have shape (B, D)=(", b, ", ", d, ") or (B, 1, D)=(", b, ", 1, ",
            d, "), got ", shape_str(gate.sizes()));
  ILF_CHECK_FLOATING("gated_residual", gate);
  ILF_CHECK_SAME_DEVICE("gated_residual", y, x);
  ILF_CHECK_SAME_DEVICE("gated_residual", gate, x);
  check_table(op, "gate_table", gate_table, x);
  ILF_CHECK("gated_residual", f.has_value() == s.has_value(), "f and s must be given together");
  if (f.has_value()) {
    ILF_CHECK("gated_residual", f->sizes() == x.sizes(), "f must have shape (B, T, D)=", shape_str(x.sizes()),
              ", got ", shape_str(f->sizes()));
    ILF_CHECK("gated_residual", f->scalar_type() == x.scalar_type(), "f must have the dtype of x (",
              dtype_str(x.scalar_type()), "), got ", dtype_str(f->scalar_type()));
    ILF_CHECK("gated_residual", c10::isFloatingType(s->scalar_type()), "s must be a floating-point tensor, got ",
              dtype_str(s->scalar_type()));
    ILF_CHECK("gated_residual", s->dim() == 0 || (s->dim() == 1 && s->size(0) == d),
              "s must be 0-dim or shape (D,)=(", d, ",), got ", shape_str(s->sizes()));
    ILF_CHECK("gated_residual", f->device() == x.device(), "f must be on the device of x (", x.device(),
              "), got ", f->device());
    ILF_CHECK("gated_residual", s->device() == x.device(), "s must be on the device of x (", x.device(),
              "), got ", s->device());
  }
}

}  // namespace ilf
