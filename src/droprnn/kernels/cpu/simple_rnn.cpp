// Fused SimpleRNN recurrence, forward and backward. Equals droprnn.cells.SimpleRNNCell run by
// kernels/reference.py, with the same masks:
//
//   h' = act(xw_t + (h_{t-1} * m) @ R);  then zoneout and the step mask as in lstm.cpp
//
// Saved: the fresh h' (B, T, U), whose activation derivative the backward needs (the carried h itself
// when there is no zoneout).
#include "checks.h"
#include "common.h"

namespace droprnn {

template <typename T>
static void simple_forward_impl(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias, const Tensor& h0,
                                const optional<Tensor>& rec_mask,
                                const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                                Tensor& hs, Tensor& fresh) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = h0.size(1);
  const GateSeq<T> x = gate_seq<T>(xw);
  const Panels<T> panels = panels_of<T>(R, 1);
  const T* bias = input_bias.has_value() && input_bias->defined() ? input_bias->data_ptr<T>() : nullptr;
  const T* h_init = h0.data_ptr<T>();
  T* h_out = hs.data_ptr<T>();
  T* f_out = fresh.data_ptr<T>();
  // Training keeps every step (slots = steps); inference h's last two steps, alternating, and fresh h' of
  // the current step only (unless every output is wanted).
  const int64_t h_slots = hs.size(1), f_slots = fresh.size(1);
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * U + 2 * U;
  Scratch<T> work(chunks * per_chunk);

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* A = work.data() + chunk * per_chunk;  // (n, U) masked h_{t-1}
    const Zoneout<T> kh = with_buffer(zh, A + rows_max * U, U);
    T* zeros = A + rows_max * U + U;          // (U,): the input bias when there is none
    std::fill(zeros, zeros + U, T(0));
    const T* b_in = bias ? bias : zeros;
    for (int64_t t = 0; t < steps; ++t) {
      const T* h_prev = t == 0 ? h_init + r0 * U : h_out + (r0 * h_slots + (t - 1) % h_slots) * U;
      const int64_t ldh = t == 0 ? U : h_slots * U;
      // The product lands straight in the saved buffer, then becomes h' in place.
      recurrent_product(h_prev, ldh, r0, r1, rec, t, panels, 1, A, f_out + (r0 * f_slots + t % f_slots) * U,
                        f_slots * U);
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        T* fr = f_out + (b * f_slots + t % f_slots) * U;
        const T* xr = x.at(b, t, 0);
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) fr[j] = (xr[j] + b_in[j]) + fr[j];
        activate(act, fr, U);
        const T* hp = h_prev + (b - r0) * ldh;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* hr = h_out + (b * h_slots + t % h_slots) * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) hr[j] = carried(hp[j], fr[j], keep[j], vb);
      }
    }
    bf16_release(panels.packed);
  });
}

static CallDims check_simple_rnn_forward(const char* fn, const Tensor& xw, const Tensor& R,
                                         const optional<Tensor>& input_bias, const Tensor& h0,
                                         const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                                         const optional<Tensor>& valid, int64_t act) {
  check_dim(fn, xw, "xw", 4);
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3);
  const CallDims d{fn, B, steps, 1, U, U, 0, call_dtype(fn, xw)};
  check_gates(d, xw, "xw");
  check_panels(d, R, rec_mask, true);
  check_optional(d, input_bias, "input_bias", {U});
  check_tensor(d, h0, "h0", {B, U});
  check_recurrent_mask(d, rec_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", U);
  check_valid(d, valid);
  check_activations(d, act, act);
  return d;
}

std::tuple<Tensor, Tensor> simple_rnn_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                              const Tensor& h0, const optional<Tensor>& rec_mask,
                                              const optional<Tensor>& zoneout_h, const optional<Tensor>& valid,
                                              int64_t act) {
  const CallDims d = check_simple_rnn_forward("droprnn simple_rnn_forward", xw, R, input_bias, h0, rec_mask, zoneout_h,
                                              valid, act);
  Tensor hs = pooled_empty({d.B, d.T, d.U}, h0.options());
  // Without zoneout the carried state is h' wherever a gradient flows (masked steps pass none through
  // the activation), so one tensor serves both: half the memory kept for the backward.
  const bool zoned = zoneout_h.has_value() && zoneout_h->defined();
  Tensor fresh = zoned ? pooled_empty({d.B, d.T, d.U}, h0.options()) : hs;
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_simple_rnn_forward", [&] {
    simple_forward_impl<scalar_t>(xw, R, input_bias, h0, rec_mask, zoneout_h, valid, act, hs, fresh);
  });
  return {hs, fresh};
}

// The forward with no backward to follow (as lstm_inference): returns h (B, T, U), or (B, U) with
// `all_steps` false.
Tensor simple_rnn_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias, const Tensor& h0,
                            const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                            const optional<Tensor>& valid, int64_t act, bool all_steps) {
  const CallDims d = check_simple_rnn_forward("droprnn simple_rnn_inference", xw, R, input_bias, h0, rec_mask,
                                              zoneout_h, valid, act);
  Tensor hs = pooled_empty({d.B, all_steps ? d.T : 2, d.U}, h0.options());
  const bool zoned = zoneout_h.has_value() && zoneout_h->defined();
  Tensor fresh = zoned ? pooled_empty({d.B, 1, d.U}, h0.options()) : hs;
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_simple_rnn_inference", [&] {
    simple_forward_impl<scalar_t>(xw, R, input_bias, h0, rec_mask, zoneout_h, valid, act, hs, fresh);
  });
  return all_steps ? hs : hs.select(1, (d.T - 1) % 2).contiguous();
}

template <typename T>
static void simple_backward_impl(const Tensor& dhs, const KernelT& RT, const Tensor& KT, const Tensor& x,
                                 const Tensor& h0, const Tensor& hs, const Tensor& fresh,
                                 const optional<Tensor>& input_mask, const optional<Tensor>& rec_mask,
                                 const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                                 bool want_dx, const Tensor& dx, Tensor& dK, Tensor& db, Tensor& dR, Tensor& dh0,
                                 const Tensor& dz) {
  const int64_t B = fresh.size(0), steps = fresh.size(1), U = fresh.size(2), D = x.size(2);
  const T* dh_in = dhs.data_ptr<T>();
  const T* rt = RT.data<T>();
  const T* h_init = h0.data_ptr<T>();
  const T* h_all = hs.data_ptr<T>();
  const T* f_all = fresh.data_ptr<T>();
  InputSide<T> in{x.data_ptr<T>(), KT.data_ptr<T>(), gated_mask<T>(input_mask), D,
                  want_dx ? dx.data_ptr<T>() : nullptr, dK.defined(), db.defined()};
  const bool want_dR = dR.defined();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;
  const StepGrads<T> kept = step_grads<T>(dz);

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t wide = std::max(U, D);
  const int64_t per_chunk = rows_max * (2 * U + wide) + wide * rows_max + U;
  Scratch<T> work(chunks * per_chunk);
  const int64_t acc_size = (want_dR ? U * U : 0) + (in.want_kernel ? D * U : 0) + (in.want_bias ? U : 0);
  Scratch<T> acc(chunks * acc_size, true);

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;  // (n, U)
    T* Dz = dh_carry + rows_max * U;                 // (n, U) gradients at the pre-activation
    T* tmp = Dz + rows_max * U;                      // (n, max(U, D))
    T* ST = tmp + rows_max * wide;                   // (max(U, D), n): one gate, so no mask columns
    const Zoneout<T> kh = with_buffer(zh, ST + wide * rows_max, U);
    T* dR_acc = acc.data() + chunk * acc_size;
    T* dK_acc = dR_acc + (want_dR ? U * U : 0);
    T* db_acc = dK_acc + (in.want_kernel ? D * U : 0);
    std::fill(dh_carry, dh_carry + n * U, T(0));
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        const T* fr = f_all + row * U;
        const T* dhr = dh_in + row * U;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * U;
        T* dz = Dz + (b - r0) * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dh = dhr[j] + dhc[j];
          const T dH = vb * Dh;
          dz[j] = (T(1) - keep[j]) * dH;  // before the activation's derivative
          dhc[j] = (T(1) - vb) * Dh + keep[j] * dH;
        }
        scale_by_act_grad(act, dz, fr, U);
      }
      if (kept.present()) kept.keep(0, Dz, U, U, r0, r1, t);
      const T* h_prev = t == 0 ? h_init + r0 * U : h_all + (r0 * steps + t - 1) * U;
      const int64_t ldh = t == 0 ? U : steps * U;
      if (want_dR) weight_grad(h_prev, ldh, r0, r1, U, rec, t, Dz, U, 1, U, dR_acc, U, ST);
      accumulate_input_side(in, Dz, U, 1, U, r0, r1, t, steps, tmp, ST, dK_acc, db_acc);
      product_grad(Dz, U, r0, r1, t, 1, U, rt, U, rec, tmp, dh_carry, U, true, RT.packed);
    }
    bf16_release(RT.packed);
    std::copy(dh_carry, dh_carry + n * U, dh0.data_ptr<T>() + r0 * U);
  });
  reduce_chunks(acc.data(), chunks, acc_size, {&dR, &dK, &db});
}

Grads simple_rnn_backward(const Tensor& dhs, const Tensor& R, const Tensor& kernel, const Tensor& x, const Tensor& h0,
                          const Tensor& hs, const Tensor& fresh, const optional<Tensor>& input_mask,
                          const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                          const optional<Tensor>& valid, int64_t act, bool want_dx, bool want_dkernel,
                          bool want_dbias, bool want_dR, bool want_dz) {
  const CallDims d = backward_dims("droprnn simple_rnn_backward", x, R, kernel, dhs, 1);
  const int64_t U = d.U;
  check_tensor(d, h0, "h0", {d.B, U});
  check_tensor(d, hs, "hs", {d.B, d.T, U});
  check_tensor(d, fresh, "fresh", {d.B, d.T, U});
  check_input_mask(d, input_mask);
  check_recurrent_mask(d, rec_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", U);
  check_valid(d, valid);
  check_activations(d, act, act);
  Tensor dx = want_dx ? pooled_empty(x.sizes(), x.options()) : Tensor();
  Tensor dK = want_dkernel ? pooled_empty(kernel.sizes(), kernel.options()) : Tensor();  // contiguous, whatever kernel's strides
  Tensor db = want_dbias ? pooled_empty({kernel.size(1)}, x.options()) : Tensor();
  Tensor dR = want_dR ? pooled_empty(R.sizes(), x.options()) : Tensor();
  Tensor dh0 = pooled_empty(h0.sizes(), h0.options());
  Tensor dz = deferred_grads(want_dz, x.size(0), x.size(1), kernel.size(1), x, R);
  const Tensor KT = want_dx ? transposed(kernel) : kernel;  // read for dx only
  AT_DISPATCH_FLOATING_TYPES(fresh.scalar_type(), "droprnn_simple_rnn_backward", [&] {
    simple_backward_impl<scalar_t>(dhs, kernel_transposed(R, 1), KT, x, h0, hs, fresh, input_mask,
                                   rec_mask, zoneout_h, valid, act, want_dx, dx, dK, db, dR, dh0, dz);
  });
  return {dx, dK, db, dR, Tensor(), dh0, Tensor(), dz};
}

}  // namespace droprnn
