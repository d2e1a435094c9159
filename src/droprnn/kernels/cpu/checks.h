// What every entry point checks before it touches memory: the kernels index raw pointers by the sizes of a
// few tensors, so every other tensor must match those sizes, dtype, device and the layout the kernels walk.
// Anything from Python reaches these functions (torch.ops.droprnn_cpu.*), so a wrong shape must raise here,
// never read or write memory a tensor does not own.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace droprnn {

// The sizes of one call: batch, steps, gate blocks, units, h's size (units, or the projection's) and the
// input features (0 where the entry point has no input), and the dtype everything is in.
struct CallDims {
  const char* fn;
  int64_t B, T, G, U, H, D;
  at::ScalarType dtype;
};

inline std::string shape_text(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + (sizes.size() == 1 ? ",)" : ")");
}

// How the kernels walk a tensor: as one contiguous block, row by row (unit stride on the last axis, no two
// elements in one place), or through a copy they make themselves (any layout).
enum class Layout { kContiguous, kRows, kAny };

// A tensor the kernels read or write: on the CPU, in the call's dtype, of exactly these sizes, and laid out
// as they walk it.
inline void check_tensor(const CallDims& d, const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                         Layout layout = Layout::kContiguous) {
  TORCH_CHECK(t.defined(), d.fn, ": ", name, " is missing");
  TORCH_CHECK(t.device().is_cpu(), d.fn, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == d.dtype, d.fn, ": ", name, " must be ", d.dtype, " (as the call), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, d.fn, ": ", name, " must have shape ", shape_text(sizes), ", got ",
              shape_text(t.sizes()));
  if (layout == Layout::kRows) {
    TORCH_CHECK(t.dim() == 0 || t.numel() == 0 ||
                    ((t.size(-1) <= 1 || t.stride(-1) == 1) && t.is_non_overlapping_and_dense()),
                d.fn, ": ", name, " must have a unit stride on its last axis and no overlapping elements");
  } else if (layout == Layout::kContiguous) {
    TORCH_CHECK(t.is_contiguous(), d.fn, ": ", name, " must be contiguous");
  }
}

inline void check_optional(const CallDims& d, const std::optional<at::Tensor>& t, const char* name,
                           at::IntArrayRef sizes, Layout layout = Layout::kContiguous) {
  if (t.has_value() && t->defined()) check_tensor(d, *t, name, sizes, layout);
}

// A mask read row by row (unit stride on its last axis) in one of the shapes `options` lists.
inline void check_mask(const CallDims& d, const std::optional<at::Tensor>& t, const char* name,
                       const std::vector<std::vector<int64_t>>& options) {
  if (!t.has_value() || !t->defined()) return;
  for (const auto& sizes : options) {
    if (t->sizes() == at::IntArrayRef(sizes)) {
      check_tensor(d, *t, name, sizes, Layout::kRows);
      return;
    }
  }
  std::string expected;
  for (size_t i = 0; i < options.size(); ++i) expected += (i ? " or " : "") + shape_text(options[i]);
  TORCH_CHECK(false, d.fn, ": ", name, " must have shape ", expected, ", got ", shape_text(t->sizes()));
}

// Input masks (m, B, D) with m in {1, G}, or per step (T, 1, B, D); recurrent masks likewise over H (per
// step with m in {1, G}); an update mask (B, U) or (T, B, U); zoneout a 0-d expectation or (T, B, size).
inline void check_input_mask(const CallDims& d, const std::optional<at::Tensor>& t) {
  check_mask(d, t, "input_mask", {{1, d.B, d.D}, {d.G, d.B, d.D}, {d.T, 1, d.B, d.D}});
}

inline void check_recurrent_mask(const CallDims& d, const std::optional<at::Tensor>& t) {
  check_mask(d, t, "recurrent_mask", {{1, d.B, d.H}, {d.G, d.B, d.H}, {d.T, 1, d.B, d.H}, {d.T, d.G, d.B, d.H}});
}

inline void check_update_mask(const CallDims& d, const std::optional<at::Tensor>& t) {
  check_mask(d, t, "update_mask", {{d.B, d.U}, {d.T, d.B, d.U}});
}

inline void check_zoneout(const CallDims& d, const std::optional<at::Tensor>& t, const char* name, int64_t size) {
  check_mask(d, t, name, {{}, {d.T, d.B, size}});
}

inline void check_valid(const CallDims& d, const std::optional<at::Tensor>& t) {
  check_optional(d, t, "valid", {d.B, d.T});
}

inline void check_activations(const CallDims& d, int64_t act, int64_t rec_act) {
  TORCH_CHECK(act >= 0 && act <= 4 && rec_act >= 0 && rec_act <= 4, d.fn,
              ": activation codes must be in [0, 4] (tanh, sigmoid, hard_sigmoid, relu, linear), got ", act, " and ",
              rec_act);
}

// A tensor whose sizes set the call's: it must have `dim` axes before they are read.
inline void check_dim(const char* fn, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is missing");
  TORCH_CHECK(t.dim() == dim, fn, ": ", name, " must have ", dim, " dimensions, got shape ", shape_text(t.sizes()));
}

// The floating dtype of a call, from the tensor that sets it.
inline at::ScalarType call_dtype(const char* fn, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": the first tensor is missing");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn,
              ": the fused kernels run float32 and float64, got ", t.scalar_type());
  return t.scalar_type();
}

// The projections (B, T, G, U) a forward reads and overwrites with the gates; the gates a backward reads.
inline void check_gates(const CallDims& d, const at::Tensor& t, const char* name) {
  check_tensor(d, t, name, {d.B, d.T, d.G, d.U}, Layout::kRows);
}

bool bf16_products_available();

// The recurrent kernel: in the call's dtype, or bfloat16 in a float32 call (bfloat16 products, bf16.h).
inline void check_recurrent_kernel(const CallDims& d, const at::Tensor& R, const char* name, at::IntArrayRef sizes,
                                   Layout layout) {
  if (R.defined() && R.scalar_type() == at::kBFloat16 && d.dtype == at::kFloat) {
    TORCH_CHECK(bf16_products_available(), d.fn, ": a bfloat16 ", name,
                " asks for bfloat16 products, which this CPU does not run (oneDNN's brgemm)");
    // only packed (bf16.cpp), which reads any strides
    check_tensor(CallDims{d.fn, d.B, d.T, d.G, d.U, d.H, d.D, at::kBFloat16}, R, name, sizes, Layout::kAny);
    return;
  }
  check_tensor(d, R, name, sizes, layout);
}

// The recurrent kernel as a forward's panels (P, H, N): one panel (P = 1, N = G·U), or one per gate
// (P = G, N = U), which per-gate recurrent masks need.
inline void check_panels(const CallDims& d, const at::Tensor& R, const std::optional<at::Tensor>& rec_mask,
                         bool one_per_gate) {
  TORCH_CHECK(R.dim() == 3, d.fn, ": recurrent_kernel panels must be 3-d (panels, H, N), got ", shape_text(R.sizes()));
  const bool per_gate_masks = rec_mask.has_value() && rec_mask->defined() && rec_mask->dim() >= 3 &&
                              rec_mask->size(-3) > 1;
  const char* name = "recurrent_kernel panels";
  if (one_per_gate || per_gate_masks) {
    check_recurrent_kernel(d, R, name, {d.G, d.H, d.U}, Layout::kContiguous);
  } else if (R.size(0) == 1) {
    check_recurrent_kernel(d, R, name, {1, d.H, d.G * d.U}, Layout::kContiguous);
  } else {
    check_recurrent_kernel(d, R, name, {d.G, d.H, d.U}, Layout::kContiguous);
  }
}

// An LSTM's projection P (U, H), contiguous, of the call's dtype, with fewer features than units; without
// one, h has `units` features. Not with bfloat16 products.
inline void check_projection(const CallDims& d, const at::Tensor& R, const std::optional<at::Tensor>& projection) {
  if (!projection.has_value() || !projection->defined()) {
    TORCH_CHECK(d.H == d.U, d.fn, ": without a projection h0 must have `units` = ", d.U, " features, got ", d.H);
    return;
  }
  TORCH_CHECK(R.scalar_type() != at::kBFloat16, d.fn, ": a projection does not run with bfloat16 products");
  TORCH_CHECK(d.H < d.U, d.fn, ": a projection has fewer features than units (", d.U, "), got ", d.H);
  check_tensor(d, *projection, "projection", {d.U, d.H}, Layout::kContiguous);
}

// A backward's sizes, set by x (B, T, D) and the recurrent kernel (H, G·U) (H = U but for a projection), and the
// checks of the tensors that set them and of the output's gradient dhs (B, T, U).
inline CallDims backward_dims(const char* fn, const at::Tensor& x, const at::Tensor& R, const at::Tensor& kernel,
                              const at::Tensor& dhs, int64_t G, bool projected = false) {
  check_dim(fn, x, "x", 3);
  check_dim(fn, R, "recurrent_kernel", 2);
  // (H, G·U): H = U unless an LSTM's projection makes h narrower
  const int64_t U = projected ? R.size(1) / G : R.size(0), H = R.size(0);
  const CallDims d{fn, x.size(0), x.size(1), G, U, H, x.size(2), call_dtype(fn, x)};
  check_tensor(d, x, "x", {d.B, d.T, d.D});
  check_tensor(d, dhs, "dhs", {d.B, d.T, H});
  check_recurrent_kernel(d, R, "recurrent_kernel", {H, G * U}, Layout::kAny);
  check_tensor(d, kernel, "kernel", {d.D, G * U}, Layout::kAny);
  return d;
}

}  // namespace droprnn
