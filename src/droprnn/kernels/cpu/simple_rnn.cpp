// Fused SimpleRNN recurrence, forward and backward. Equals droprnn.cells.SimpleRNNCell run by
// kernels/reference.py, with the same masks:
//
//   h' = act(xw_t + (h_{t-1} * m) @ R);  then zoneout and the step mask as in lstm.cpp
//
// Saved: the fresh h' (B, T, U), whose activation derivative the backward needs.
#include "common.h"

namespace droprnn {

template <typename T>
static void simple_forward_impl(const Tensor& xw, const Tensor& R, const Tensor& h0, const optional<Tensor>& rec_mask,
                                const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                                Tensor& hs, Tensor& fresh) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = h0.size(1);
  const T* x = xw.data_ptr<T>();
  const T* r = R.data_ptr<T>();
  const T* h_init = h0.data_ptr<T>();
  T* h_out = hs.data_ptr<T>();
  T* f_out = fresh.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * U + U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* A = work.data() + chunk * per_chunk;  // (n, U) masked h_{t-1}
    const Zoneout<T> kh = with_buffer(zh, A + rows_max * U, U);
    for (int64_t t = 0; t < steps; ++t) {
      const T* h_prev = t == 0 ? h_init + r0 * U : h_out + (r0 * steps + t - 1) * U;
      const int64_t ldh = t == 0 ? U : steps * U;
      // The product lands straight in the saved buffer, then becomes h' in place.
      T* out0 = f_out + (r0 * steps + t) * U;
      if (!rec.present()) {
        gemm(n, U, U, h_prev, ldh, r, U, out0, steps * U, false);
      } else {
        masked_rows(h_prev - r0 * ldh, ldh, r0, r1, U, rec, t, 0, A);
        gemm(n, U, U, A, U, r, U, out0, steps * U, false);
      }
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        T* fr = f_out + row * U;
        const T* xr = x + row * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) fr[j] = xr[j] + fr[j];
        activate(act, fr, U);
        const T* hp = h_prev + (b - r0) * ldh;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* hr = h_out + row * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T zoned = keep[j] * hp[j] + (T(1) - keep[j]) * fr[j];
          hr[j] = vb * zoned + (T(1) - vb) * hp[j];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> simple_rnn_forward(const Tensor& xw, const Tensor& R, const Tensor& h0,
                                              const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                                              const optional<Tensor>& valid, int64_t act) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = h0.size(1);
  Tensor hs = at::empty({B, steps, U}, xw.options());
  Tensor fresh = at::empty({B, steps, U}, xw.options());
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "droprnn_simple_rnn_forward", [&] {
    simple_forward_impl<scalar_t>(xw, R, h0, rec_mask, zoneout_h, valid, act, hs, fresh);
  });
  return {hs, fresh};
}

template <typename T>
static void simple_backward_impl(const Tensor& dhs, const Tensor& RT, const Tensor& fresh,
                                 const optional<Tensor>& rec_mask, const optional<Tensor>& zoneout_h,
                                 const optional<Tensor>& valid, int64_t act, Tensor& dxw, Tensor& dh0) {
  const int64_t B = fresh.size(0), steps = fresh.size(1), U = fresh.size(2);
  const T* dh_in = dhs.data_ptr<T>();
  const T* rt = RT.data_ptr<T>();
  const T* f_all = fresh.data_ptr<T>();
  T* dx = dxw.data_ptr<T>();
  T* dh0p = dh0.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * 2 * U + U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;
    T* tmp = dh_carry + rows_max * U;
    const Zoneout<T> kh = with_buffer(zh, tmp + rows_max * U, U);
    std::fill(dh_carry, dh_carry + n * U, T(0));
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        const T* fr = f_all + row * U;
        const T* dhr = dh_in + row * U;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * U;
        T* dz = dx + row * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dh = dhr[j] + dhc[j];
          const T dH = vb * Dh;
          dz[j] = (T(1) - keep[j]) * dH;  // before the activation's derivative
          dhc[j] = (T(1) - vb) * Dh + keep[j] * dH;
        }
        scale_by_act_grad(act, dz, fr, U);
      }
      const T* dz0 = dx + (r0 * steps + t) * U;
      if (!rec.present()) {
        gemm(n, U, U, dz0, steps * U, rt, U, dh_carry, U, true);
      } else {
        gemm(n, U, U, dz0, steps * U, rt, U, tmp, U, false);
        for (int64_t b = r0; b < r1; ++b) {
          const T* m = rec.row(t, 0, b);
          T* dhc = dh_carry + (b - r0) * U;
          const T* tr = tmp + (b - r0) * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) dhc[j] += tr[j] * m[j];
        }
      }
    }
    std::copy(dh_carry, dh_carry + n * U, dh0p + r0 * U);
  });
}

std::tuple<Tensor, Tensor> simple_rnn_backward(const Tensor& dhs, const Tensor& RT, const Tensor& h0,
                                               const Tensor& fresh, const optional<Tensor>& rec_mask,
                                               const optional<Tensor>& zoneout_h, const optional<Tensor>& valid,
                                               int64_t act) {
  Tensor dxw = at::empty_like(fresh);
  Tensor dh0 = at::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(fresh.scalar_type(), "droprnn_simple_rnn_backward", [&] {
    simple_backward_impl<scalar_t>(dhs, RT, fresh, rec_mask, zoneout_h, valid, act, dxw, dh0);
  });
  return {dxw, dh0};
}

}  // namespace droprnn
