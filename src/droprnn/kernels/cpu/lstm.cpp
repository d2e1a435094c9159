// Fused LSTM recurrence (Keras gate order i, f, c, o), forward and backward. Equals droprnn.cells.LSTMCell
// run by kernels/reference.py, with the same masks:
//
//   z   = xw_t + sum_g (h_{t-1} * m_g) @ R_g          xw_t: input projections incl. bias (one big GEMM outside)
//   i, f, o = rec(z_i, z_f, z_o);  g = act(z_c)
//   c'  = f * c_{t-1} + i * (g * u)                     u: update mask (Semeniuta), else 1
//   h'  = o * act(c')
//   zoneout: s' = d * s_{t-1} + (1 - d) * s'            d: indicator (training) or rate (inference)
//   step mask: s_t = v * s' + (1 - v) * s_{t-1}          v in {0, 1}
//
// Saved for the backward: the activated gates (B, T, 4U) and act(c') (B, T, U). The weight gradient is
// not formed here: dxw (B, T, 4U) is returned and the caller forms dR with one GEMM per gate over all
// timesteps.
#include "common.h"

namespace droprnn {

template <typename T>
static void lstm_forward_impl(const Tensor& xw, const Tensor& R, const Tensor& h0, const Tensor& c0,
                              const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                              const optional<Tensor>& zoneout_h, const optional<Tensor>& zoneout_c,
                              const optional<Tensor>& valid, int64_t act, int64_t rec_act, Tensor& hs, Tensor& cs,
                              Tensor& gates, Tensor& tc) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = R.size(1) / 4, H = R.size(0), G4 = 4 * U;
  const T* x = xw.data_ptr<T>();
  const T* r = R.data_ptr<T>();
  const T* h_init = h0.data_ptr<T>();
  const T* c_init = c0.data_ptr<T>();
  T* h_out = hs.data_ptr<T>();
  T* c_out = cs.data_ptr<T>();
  T* g_out = gates.data_ptr<T>();
  T* tc_out = tc.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h), zc = zoneout_of<T>(zoneout_c);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  // Work buffers, one set per chunk, allocated once per call (never inside the time loop).
  const int64_t per_chunk = rows_max * (G4 + H) + 3 * U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* Z = work.data() + chunk * per_chunk;       // (n, 4U) pre-activations, then gates
    T* A = Z + rows_max * G4;                      // (n, H) masked h_{t-1}
    T* ones = A + rows_max * H;                    // (U,): the update mask when there is none
    std::fill(ones, ones + U, T(1));
    const Zoneout<T> kh = with_buffer(zh, ones + U, U), kc = with_buffer(zc, ones + 2 * U, U);
    for (int64_t t = 0; t < steps; ++t) {
      const T* h_prev = t == 0 ? h_init + r0 * H : h_out + (r0 * steps + t - 1) * H;
      const int64_t ldh = t == 0 ? H : steps * H;
      const T* c_prev = t == 0 ? c_init + r0 * U : c_out + (r0 * steps + t - 1) * U;
      const int64_t ldc = t == 0 ? U : steps * U;
      if (!rec.present()) {
        gemm(n, G4, H, h_prev, ldh, r, G4, Z, G4, false);
      } else if (rec.gate_stride == 0) {
        masked_rows(h_prev - r0 * ldh, ldh, r0, r1, H, rec, t, 0, A);
        gemm(n, G4, H, A, H, r, G4, Z, G4, false);
      } else {
        for (int64_t g = 0; g < 4; ++g) {
          masked_rows(h_prev - r0 * ldh, ldh, r0, r1, H, rec, t, g, A);
          gemm(n, U, H, A, H, r + g * U, G4, Z + g * U, G4, false);
        }
      }
      for (int64_t b = r0; b < r1; ++b) {
        T* z = Z + (b - r0) * G4;
        const T* xr = x + (b * steps + t) * G4;
#pragma omp simd
        for (int64_t j = 0; j < G4; ++j) z[j] += xr[j];
        activate(rec_act, z, 2 * U);
        activate(act, z + 2 * U, U);
        activate(rec_act, z + 3 * U, U);
        std::copy(z, z + G4, g_out + (b * steps + t) * G4);
        const T* ig = z;
        const T* fg = z + U;
        const T* gg = z + 2 * U;
        const T* og = z + 3 * U;
        const T* cp = c_prev + (b - r0) * ldc;
        const T* hp = h_prev + (b - r0) * ldh;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* dh = kh.row(t, b);
        const T* dc = kc.row(t, b);
        T* tcr = tc_out + (b * steps + t) * U;
        T* cr = c_out + (b * steps + t) * U;
        T* hr = h_out + (b * steps + t) * H;
        const T vb = v ? v[b * steps + t] : T(1);
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T fresh = fg[j] * cp[j] + ig[j] * (gg[j] * u[j]);
          const T zoned = dc[j] * cp[j] + (T(1) - dc[j]) * fresh;
          cr[j] = vb * zoned + (T(1) - vb) * cp[j];
          tcr[j] = fresh;
        }
        activate(act, tcr, U);  // now act(c')
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T fresh = og[j] * tcr[j];
          const T zoned = dh[j] * hp[j] + (T(1) - dh[j]) * fresh;
          hr[j] = vb * zoned + (T(1) - vb) * hp[j];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& xw, const Tensor& R, const Tensor& h0,
                                                        const Tensor& c0, const optional<Tensor>& rec_mask,
                                                        const optional<Tensor>& upd_mask,
                                                        const optional<Tensor>& zoneout_h,
                                                        const optional<Tensor>& zoneout_c,
                                                        const optional<Tensor>& valid, int64_t act, int64_t rec_act) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = R.size(1) / 4, H = R.size(0);
  TORCH_CHECK(H == U, "droprnn fused LSTM: projections are not supported (recurrent kernel rows must equal units)");
  Tensor hs = at::empty({B, steps, H}, xw.options());
  Tensor cs = at::empty({B, steps, U}, xw.options());
  Tensor gates = at::empty({B, steps, 4 * U}, xw.options());
  Tensor tc = at::empty({B, steps, U}, xw.options());
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "droprnn_lstm_forward", [&] {
    lstm_forward_impl<scalar_t>(xw, R, h0, c0, rec_mask, upd_mask, zoneout_h, zoneout_c, valid, act, rec_act, hs, cs,
                                gates, tc);
  });
  return {hs, cs, gates, tc};
}

template <typename T>
static void lstm_backward_impl(const Tensor& dhs, const Tensor& dcs, const Tensor& RT, const Tensor& h0,
                               const Tensor& c0, const Tensor& hs, const Tensor& cs, const Tensor& gates,
                               const Tensor& tc, const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                               const optional<Tensor>& zoneout_h, const optional<Tensor>& zoneout_c,
                               const optional<Tensor>& valid, int64_t act, int64_t rec_act, Tensor& dxw, Tensor& dh0,
                               Tensor& dc0) {
  const int64_t B = hs.size(0), steps = hs.size(1), H = hs.size(2), U = cs.size(2), G4 = 4 * U;
  const T* dh_in = dhs.data_ptr<T>();
  const T* dc_in = dcs.data_ptr<T>();
  const T* rt = RT.data_ptr<T>();  // (4U, H): R transposed, so each gate block is a row block
  const T* c_init = c0.data_ptr<T>();
  const T* c_all = cs.data_ptr<T>();
  const T* g_all = gates.data_ptr<T>();
  const T* tc_all = tc.data_ptr<T>();
  T* dx = dxw.data_ptr<T>();
  T* dh0p = dh0.data_ptr<T>();
  T* dc0p = dc0.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h), zc = zoneout_of<T>(zoneout_c);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * (H + U + H) + 4 * U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;  // (n, H): dL/dh_t flowing to step t-1
    T* dc_carry = dh_carry + rows_max * H;           // (n, U)
    T* tmp = dc_carry + rows_max * U;                // (n, H) GEMM result before masking
    T* dtc = tmp + rows_max * H;                     // (U,) one row's d act(c')
    T* ones = dtc + U;
    std::fill(ones, ones + U, T(1));
    const Zoneout<T> kh = with_buffer(zh, ones + U, U), kc = with_buffer(zc, ones + 2 * U, U);
    std::fill(dh_carry, dh_carry + n * H, T(0));
    std::fill(dc_carry, dc_carry + n * U, T(0));
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        const T* cp = t == 0 ? c_init + b * U : c_all + (row - 1) * U;
        const T* ig = g_all + row * G4;
        const T* fg = ig + U;
        const T* gg = ig + 2 * U;
        const T* og = ig + 3 * U;
        const T* tcr = tc_all + row * U;
        const T* dhr = dh_in + row * H;
        const T* dcr = dc_in + row * U;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* dzh = kh.row(t, b);
        const T* dzc = kc.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * H;
        T* dcc = dc_carry + (b - r0) * U;
        T* dz = dx + row * G4;
        // Two element-wise passes around vectorised activation-derivative passes (a switch on the
        // activation inside a loop would keep it scalar).
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dh = dhr[j] + dhc[j];
          const T dH = vb * Dh;
          const T dh_new = (T(1) - dzh[j]) * dH;
          dz[3 * U + j] = dh_new * tcr[j];            // d o, before o's derivative
          dtc[j] = dh_new * og[j];                      // d act(c'), before act's derivative
          dhc[j] = (T(1) - vb) * Dh + dzh[j] * dH;      // the recurrent GEMM adds its part below
        }
        scale_by_act_grad(act, dtc, tcr, U);
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dc = dcr[j] + dcc[j];
          const T dC = vb * Dc;
          const T dc_new = (T(1) - dzc[j]) * dC + dtc[j];
          dz[j] = dc_new * (gg[j] * u[j]);
          dz[U + j] = dc_new * cp[j];
          dz[2 * U + j] = dc_new * ig[j] * u[j];
          dcc[j] = (T(1) - vb) * Dc + dzc[j] * dC + dc_new * fg[j];
        }
        scale_by_act_grad(rec_act, dz, ig, 2 * U);   // i and f are adjacent in dz and in the gates
        scale_by_act_grad(act, dz + 2 * U, gg, U);
        scale_by_act_grad(rec_act, dz + 3 * U, og, U);
      }
      // dL/dh_{t-1} += sum_g (dz_g @ R_g^T) * m_g
      const T* dz0 = dx + (r0 * steps + t) * G4;
      const int64_t ldz = steps * G4;
      if (!rec.present()) {
        gemm(n, H, G4, dz0, ldz, rt, H, dh_carry, H, true);
      } else {
        const int64_t blocks = rec.gate_stride == 0 ? 1 : 4;
        const int64_t width = rec.gate_stride == 0 ? G4 : U;
        for (int64_t g = 0; g < blocks; ++g) {
          gemm(n, H, width, dz0 + g * U, ldz, rt + g * U * H, H, tmp, H, false);
          for (int64_t b = r0; b < r1; ++b) {
            const T* m = rec.row(t, g, b);
            T* dhc = dh_carry + (b - r0) * H;
            const T* tr = tmp + (b - r0) * H;
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) dhc[j] += tr[j] * m[j];
          }
        }
      }
    }
    std::copy(dh_carry, dh_carry + n * H, dh0p + r0 * H);
    std::copy(dc_carry, dc_carry + n * U, dc0p + r0 * U);
  });
}

std::tuple<Tensor, Tensor, Tensor> lstm_backward(const Tensor& dhs, const Tensor& dcs, const Tensor& RT,
                                                 const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs,
                                                 const Tensor& gates, const Tensor& tc,
                                                 const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                                                 const optional<Tensor>& zoneout_h,
                                                 const optional<Tensor>& zoneout_c, const optional<Tensor>& valid,
                                                 int64_t act, int64_t rec_act) {
  Tensor dxw = at::empty_like(gates);
  Tensor dh0 = at::empty_like(h0);
  Tensor dc0 = at::empty_like(c0);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "droprnn_lstm_backward", [&] {
    lstm_backward_impl<scalar_t>(dhs, dcs, RT, h0, c0, hs, cs, gates, tc, rec_mask, upd_mask, zoneout_h, zoneout_c,
                                 valid, act, rec_act, dxw, dh0, dc0);
  });
  return {dxw, dh0, dc0};
}

}  // namespace droprnn
