// Registers the fused recurrences as torch operators (torch.ops.droprnn_cpu.*): the pieces kernels/fused.py
// calls inside the public operator droprnn::fused_layer (its schema, fake and autograd live there). One file
// per cell holds the math.
#include <torch/library.h>

#include "common.h"

namespace droprnn {

std::tuple<Tensor, Tensor> lstm_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                                const Tensor& h0,
                                                const Tensor& c0, const optional<Tensor>& rec_mask,
                                                const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                                const optional<Tensor>& zoneout_c, const optional<Tensor>& valid,
                                                int64_t act, int64_t rec_act, const optional<Tensor>& projection);
std::tuple<Tensor, Tensor> lstm_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                          const Tensor& h0, const Tensor& c0, const optional<Tensor>& rec_mask,
                                          const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                          const optional<Tensor>& zoneout_c, const optional<Tensor>& valid,
                                          int64_t act, int64_t rec_act, bool all_steps,
                                          const optional<Tensor>& projection);
Grads lstm_backward(const Tensor& dhs, const Tensor& dc_last, const Tensor& R, const Tensor& kernel, const Tensor& x,
                    const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs, const Tensor& gates,
                    const optional<Tensor>& input_mask, const optional<Tensor>& rec_mask,
                    const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                    const optional<Tensor>& zoneout_c, const optional<Tensor>& valid, int64_t act, int64_t rec_act,
                    bool want_dx, bool want_dkernel, bool want_dbias, bool want_dR, bool want_dz,
                    const optional<Tensor>& projection);
std::tuple<Tensor, Tensor> gru_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                       const optional<Tensor>& rbias,
                                       const Tensor& h0, const optional<Tensor>& rec_mask,
                                       const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                       const optional<Tensor>& valid, int64_t act, int64_t rec_act, bool reset_after);
Tensor gru_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                     const optional<Tensor>& rbias, const Tensor& h0, const optional<Tensor>& rec_mask,
                     const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h, const optional<Tensor>& valid,
                     int64_t act, int64_t rec_act, bool reset_after, bool all_steps);
Grads gru_backward(const Tensor& dhs, const Tensor& R, const Tensor& kernel, const Tensor& x, const Tensor& h0,
                   const Tensor& hs, const Tensor& gates, const Tensor& inner, const optional<Tensor>& input_mask,
                   const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                   const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act, int64_t rec_act,
                   bool reset_after, bool want_dx, bool want_dkernel, bool want_dbias, bool want_dR, bool want_drb,
                   bool want_dz);
std::tuple<Tensor, Tensor> simple_rnn_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                              const Tensor& h0,
                                              const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                                              const optional<Tensor>& valid, int64_t act);
Tensor simple_rnn_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias, const Tensor& h0,
                            const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                            const optional<Tensor>& valid, int64_t act, bool all_steps);
Grads simple_rnn_backward(const Tensor& dhs, const Tensor& R, const Tensor& kernel, const Tensor& x, const Tensor& h0,
                          const Tensor& hs, const Tensor& fresh, const optional<Tensor>& input_mask,
                          const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                          const optional<Tensor>& valid, int64_t act, bool want_dx, bool want_dkernel,
                          bool want_dbias, bool want_dR, bool want_dz);

Tensor pooled_empty_op(at::IntArrayRef sizes, at::ScalarType dtype);

// The side of the products' blocks (kernels/cpu/machine.py derives it from the L2 cache).
int64_t set_gemm_block(int64_t side) {
  TORCH_CHECK(side >= 16 && side <= 4096 && side % 16 == 0, "droprnn set_gemm_block: a multiple of 16 in [16, 4096] "
              "is expected, got ", side);
  gemm_block() = side;
  return side;
}
int64_t empty_cache();
int64_t cached_bytes();
void bf16_mm(const Tensor& a, const Tensor& b, Tensor& out);
void float_mm(const Tensor& a, const Tensor& b, Tensor& out);

}  // namespace droprnn

TORCH_LIBRARY(droprnn_cpu, m) {
  m.def("lstm_forward", &droprnn::lstm_forward);
  m.def("lstm_inference", &droprnn::lstm_inference);
  m.def("lstm_backward", &droprnn::lstm_backward);
  m.def("gru_forward", &droprnn::gru_forward);
  m.def("gru_inference", &droprnn::gru_inference);
  m.def("gru_backward", &droprnn::gru_backward);
  m.def("simple_rnn_forward", &droprnn::simple_rnn_forward);
  m.def("simple_rnn_inference", &droprnn::simple_rnn_inference);
  m.def("simple_rnn_backward", &droprnn::simple_rnn_backward);
  m.def("empty", &droprnn::pooled_empty_op);
  m.def("set_gemm_block", &droprnn::set_gemm_block);
  m.def("empty_cache", &droprnn::empty_cache);
  m.def("cached_bytes", &droprnn::cached_bytes);
  m.def("bf16_products", [] { return droprnn::bf16_products_available(); });
  m.def("bf16_engine", [] { return droprnn::bf16_engine_name(); });
  m.def("bf16_mm(Tensor a, Tensor b, Tensor(a!) out) -> ()");
  m.def("float_mm(Tensor a, Tensor b, Tensor(a!) out) -> ()");
  m.impl("bf16_mm", c10::DispatchKey::CPU, &droprnn::bf16_mm);
  m.impl("float_mm", c10::DispatchKey::CPU, &droprnn::float_mm);
}
