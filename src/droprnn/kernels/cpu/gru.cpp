// Fused GRU recurrence (Keras gate order z, r, h), both reset_after forms, forward and backward. Equals
// droprnn.cells.GRUCell run by kernels/reference.py, with the same masks:
//
//   reset_after:  inner = sum_g (h_{t-1} * m_g) @ R_g + rb
//                 z = rec(xw_z + inner_z);  r = rec(xw_r + inner_r);  n = act(xw_h + r * inner_h)
//   reset_before: z = rec(xw_z + (h * m_z) @ R_z);  r = rec(xw_r + (h * m_r) @ R_r)
//                 n = act(xw_h + (r * (h * m_h)) @ R_h)          a second, dependent product per step
//   h' = z * h_{t-1} + (1 - z) * (n * u);  then zoneout and the step mask as in lstm.cpp
//
// Saved: (B, T, 4U) = [z, r, n, inner_h] (inner_h with reset_after only). The backward returns dxw and,
// with reset_after, d(inner) -- the gradient at the recurrent product's output, which differs from dxw in
// the h block -- both in xw's layout, so the caller forms dR and d(rb) with large products over all
// timesteps. reset_before needs the recurrent kernel in one panel per gate.
#include "common.h"

namespace droprnn {

template <typename T>
static void gru_forward_impl(const Tensor& xw, const Tensor& R, const optional<Tensor>& rbias, const Tensor& h0,
                             const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                             const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                             int64_t rec_act, bool reset_after, Tensor& hs, Tensor& gates) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3), G3 = 3 * U, G4 = 4 * U;
  const GateSeq<T> x = gate_seq<T>(xw);
  const Panels<T> panels = panels_of<T>(R);
  const T* rb = rbias.has_value() && rbias->defined() ? rbias->data_ptr<T>() : nullptr;
  const T* h_init = h0.data_ptr<T>();
  T* h_out = hs.data_ptr<T>();
  T* g_out = gates.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * (G3 + U) + 3 * U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));
  // reset_before: the first product covers z and r only (panels are per gate then).
  const int64_t first_panels = reset_after ? panels.count : 2;

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* Z = work.data() + chunk * per_chunk;  // (n, 3U) recurrent products
    T* A = Z + rows_max * G3;                 // (n, U) masked h_{t-1}, or r * masked h_{t-1}
    T* ones = A + rows_max * U;
    std::fill(ones, ones + 2 * U, T(1));      // the update mask / the h mask when there is none
    const Zoneout<T> kh = with_buffer(zh, ones + 2 * U, U);
    for (int64_t t = 0; t < steps; ++t) {
      const T* h_prev = t == 0 ? h_init + r0 * U : h_out + (r0 * steps + t - 1) * U;
      const int64_t ldh = t == 0 ? U : steps * U;
      recurrent_product(h_prev, ldh, r0, r1, rec, t, panels, first_panels, A, Z, G3);
      for (int64_t b = r0; b < r1; ++b) {
        T* zrow = Z + (b - r0) * G3;
        T* gr = g_out + (b * steps + t) * G4;
        if (rb != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < G3; ++j) zrow[j] += rb[j];
        }
        for (int64_t g = 0; g < 2; ++g) {
          const T* xr = x.at(b, t, g);
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) gr[g * U + j] = xr[j] + zrow[g * U + j];
        }
        activate(rec_act, gr, 2 * U);
        const T* rr = gr + U;
        if (reset_after) {
          const T* xh = x.at(b, t, 2);
          const T* inner_h = zrow + 2 * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            gr[2 * U + j] = xh[j] + rr[j] * inner_h[j];
            gr[3 * U + j] = inner_h[j];
          }
        } else {
          const T* hp = h_prev + (b - r0) * ldh;
          const T* mh = rec.present() ? rec.row(t, rec.gate_stride == 0 ? 0 : 2, b) : ones + U;
          T* ar = A + (b - r0) * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) ar[j] = rr[j] * (hp[j] * mh[j]);
        }
      }
      if (!reset_after) {
        gemm(n, U, U, A, U, panels.panel(2), U, Z + 2 * U, G3, false);
        for (int64_t b = r0; b < r1; ++b) {
          const T* zrow = Z + (b - r0) * G3;
          const T* xh = x.at(b, t, 2);
          T* gr = g_out + (b * steps + t) * G4;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) gr[2 * U + j] = xh[j] + zrow[2 * U + j];
        }
      }
      for (int64_t b = r0; b < r1; ++b) {
        T* gr = g_out + (b * steps + t) * G4;
        activate(act, gr + 2 * U, U);
        const T* zg = gr;
        const T* ng = gr + 2 * U;
        const T* hp = h_prev + (b - r0) * ldh;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[b * steps + t] : T(1);
        T* hr = h_out + (b * steps + t) * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T fresh = zg[j] * hp[j] + (T(1) - zg[j]) * (ng[j] * u[j]);
          const T zoned = keep[j] * hp[j] + (T(1) - keep[j]) * fresh;
          hr[j] = vb * zoned + (T(1) - vb) * hp[j];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> gru_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& rbias,
                                       const Tensor& h0, const optional<Tensor>& rec_mask,
                                       const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                       const optional<Tensor>& valid, int64_t act, int64_t rec_act, bool reset_after) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3);
  TORCH_CHECK(reset_after || R.size(0) == 3, "droprnn fused GRU: reset_after=False needs one panel per gate");
  Tensor hs = at::empty({B, steps, U}, h0.options());
  Tensor gates = at::empty({B, steps, 4 * U}, h0.options());
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_gru_forward", [&] {
    gru_forward_impl<scalar_t>(xw, R, rbias, h0, rec_mask, upd_mask, zoneout_h, valid, act, rec_act, reset_after, hs,
                               gates);
  });
  return {hs, gates};
}

template <typename T>
static void gru_backward_impl(const Tensor& dhs, const Tensor& RT, const Tensor& h0, const Tensor& hs,
                              const Tensor& gates, const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                              const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                              int64_t rec_act, bool reset_after, Tensor& dxw, Tensor& dinner, Tensor& dh0) {
  const int64_t B = hs.size(0), steps = hs.size(1), U = hs.size(2), G4 = 4 * U;
  const T* dh_in = dhs.data_ptr<T>();
  const T* rt = RT.data_ptr<T>();  // (3U, U)
  const T* h_init = h0.data_ptr<T>();
  const T* h_all = hs.data_ptr<T>();
  const T* g_all = gates.data_ptr<T>();
  const GateSeq<T> dx = gate_seq<T>(dxw);
  const GateSeq<T> di = reset_after ? gate_seq<T>(dinner) : dx;
  T* dh0p = dh0.data_ptr<T>();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * 2 * U + 3 * U;
  std::vector<T> work(static_cast<size_t>(chunks * per_chunk));

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;  // (n, U)
    T* tmp = dh_carry + rows_max * U;                // (n, U)
    T* ones = tmp + rows_max * U;
    std::fill(ones, ones + 2 * U, T(1));
    const Zoneout<T> kh = with_buffer(zh, ones + 2 * U, U);
    std::fill(dh_carry, dh_carry + n * U, T(0));
    for (int64_t t = steps - 1; t >= 0; --t) {
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        const T* hp = t == 0 ? h_init + b * U : h_all + (row - 1) * U;
        const T* zg = g_all + row * G4;
        const T* rg = zg + U;
        const T* ng = zg + 2 * U;
        const T* inner_h = zg + 3 * U;
        const T* dhr = dh_in + row * U;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * U;
        T* dz = dx.at(b, t, 0);
        T* dr = dx.at(b, t, 1);
        T* dn = dx.at(b, t, 2);
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dh = dhr[j] + dhc[j];
          const T dH = vb * Dh;
          const T dh_new = (T(1) - keep[j]) * dH;
          dz[j] = dh_new * (hp[j] - ng[j] * u[j]);     // before z's derivative
          dn[j] = dh_new * (T(1) - zg[j]) * u[j];      // before n's derivative
          dhc[j] = (T(1) - vb) * Dh + keep[j] * dH + dh_new * zg[j];
        }
        scale_by_act_grad(rec_act, dz, zg, U);
        scale_by_act_grad(act, dn, ng, U);
        if (reset_after) {
          T* dn_inner = di.at(b, t, 2);
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            dr[j] = dn[j] * inner_h[j];  // before r's derivative
            dn_inner[j] = dn[j] * rg[j];
          }
          scale_by_act_grad(rec_act, dr, rg, U);
          std::copy(dz, dz + U, di.at(b, t, 0));
          std::copy(dr, dr + U, di.at(b, t, 1));
        }
      }
      if (!reset_after) {
        // d(a) = dpre_n @ R_h^T, with a = r * (h * m_h); then the r gate and h through a.
        gemm(n, U, U, dx.at(r0, t, 2), dx.sb, rt + 2 * U * U, U, tmp, U, false);
        for (int64_t b = r0; b < r1; ++b) {
          const int64_t row = b * steps + t;
          const T* hp = t == 0 ? h_init + b * U : h_all + (row - 1) * U;
          const T* rg = g_all + row * G4 + U;
          const T* mh = rec.present() ? rec.row(t, rec.gate_stride == 0 ? 0 : 2, b) : ones + U;
          const T* da = tmp + (b - r0) * U;
          T* dr = dx.at(b, t, 1);
          T* dhc = dh_carry + (b - r0) * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            dr[j] = da[j] * hp[j] * mh[j];  // before r's derivative
            dhc[j] += da[j] * rg[j] * mh[j];
          }
          scale_by_act_grad(rec_act, dr, rg, U);
        }
      }
      // dL/dh_{t-1} += sum_g (d(inner)_g @ R_g^T) * m_g over the gates of the first product.
      recurrent_product_grad(di, r0, r1, t, reset_after ? 3 : 2, U, rt, U, rec, tmp, dh_carry);
    }
    std::copy(dh_carry, dh_carry + n * U, dh0p + r0 * U);
  });
}

std::tuple<Tensor, Tensor, Tensor> gru_backward(const Tensor& dhs, const Tensor& RT, const Tensor& h0,
                                                const Tensor& hs, const Tensor& gates,
                                                const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                                                const optional<Tensor>& zoneout_h, const optional<Tensor>& valid,
                                                int64_t act, int64_t rec_act, bool reset_after, bool gate_major) {
  const int64_t B = hs.size(0), steps = hs.size(1), U = hs.size(2);
  Tensor dxw = empty_gate_seq(B, steps, 3, U, gate_major, hs.options());
  Tensor dinner = reset_after ? empty_gate_seq(B, steps, 3, U, gate_major, hs.options()) : at::empty({0}, hs.options());
  Tensor dh0 = at::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "droprnn_gru_backward", [&] {
    gru_backward_impl<scalar_t>(dhs, RT, h0, hs, gates, rec_mask, upd_mask, zoneout_h, valid, act, rec_act,
                                reset_after, dxw, dinner, dh0);
  });
  return {dxw, dinner, dh0};
}

}  // namespace droprnn
