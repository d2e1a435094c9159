// Fused GRU recurrence (Keras gate order z, r, h), both reset_after forms, forward and backward. Equals
// droprnn.cells.GRUCell run by kernels/reference.py, with the same masks:
//
//   reset_after:  inner = sum_g (h_{t-1} * m_g) @ R_g + rb
//                 z = rec(xw_z + inner_z);  r = rec(xw_r + inner_r);  n = act(xw_h + r * inner_h)
//   reset_before: z = rec(xw_z + (h * m_z) @ R_z);  r = rec(xw_r + (h * m_r) @ R_r)
//                 n = act(xw_h + (r * (h * m_h)) @ R_h)          a second, dependent product per step
//   h' = z * h_{t-1} + (1 - z) * (n * u);  then zoneout and the step mask as in lstm.cpp
//
// Saved: the activated gates z, r, n, written over the input projections they came from (in xw's
// layout: no second sequence-sized buffer), and with reset_after inner_h (B, T, U). The backward
// accumulates the weight gradients step by step, in cache. reset_before needs the recurrent kernel in one
// panel per gate.
#include "checks.h"
#include "common.h"

namespace droprnn {

template <typename T>
static void gru_forward_impl(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                             const optional<Tensor>& rbias, const Tensor& h0,
                             const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                             const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                             int64_t rec_act, bool reset_after, Tensor& hs, Tensor& inner, bool save) {
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3), G3 = 3 * U;
  // Training keeps every step's h (h_slots = steps); inference the last two, alternating, unless every
  // output is wanted, and no recurrent products for a backward.
  const int64_t h_slots = hs.size(1);
  const GateSeq<T> x = gate_seq<T>(xw);
  const GateSeq<T> g_out = x;  // the activated gates overwrite xw, each element after it is read
  const Panels<T> panels = panels_of<T>(R, 3);
  const T* rb = rbias.has_value() && rbias->defined() ? rbias->data_ptr<T>() : nullptr;
  const T* bias = input_bias.has_value() && input_bias->defined() ? input_bias->data_ptr<T>() : nullptr;
  const T* h_init = h0.data_ptr<T>();
  T* h_out = hs.data_ptr<T>();
  T* inner_out = reset_after && save ? inner.data_ptr<T>() : nullptr;  // (B, T, U)
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t per_chunk = rows_max * (G3 + U) + 3 * U + G3;
  Scratch<T> work(chunks * per_chunk);
  // reset_before: the first product covers z and r only (panels are per gate then).
  const int64_t first_panels = reset_after ? panels.count : 2;

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* Z = work.data() + chunk * per_chunk;  // (n, 3U) recurrent products
    T* A = Z + rows_max * G3;                 // (n, U) masked h_{t-1}, or r * masked h_{t-1}
    T* ones = A + rows_max * U;
    std::fill(ones, ones + 2 * U, T(1));      // the update mask / the h mask when there is none
    const Zoneout<T> kh = with_buffer(zh, ones + 2 * U, U);
    T* zeros = ones + 3 * U;                  // (3U,): the input bias when there is none
    std::fill(zeros, zeros + G3, T(0));
    const T* b_in = bias ? bias : zeros;
    for (int64_t t = 0; t < steps; ++t) {
      const T* h_prev = t == 0 ? h_init + r0 * U : h_out + (r0 * h_slots + (t - 1) % h_slots) * U;
      const int64_t ldh = t == 0 ? U : h_slots * U;
      recurrent_product(h_prev, ldh, r0, r1, rec, t, panels, first_panels, A, Z, G3);
      for (int64_t b = r0; b < r1; ++b) {
        T* zrow = Z + (b - r0) * G3;
        if (rb != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < G3; ++j) zrow[j] += rb[j];
        }
        for (int64_t g = 0; g < 2; ++g) {
          T* gr = g_out.at(b, t, g);
          const T* xr = x.at(b, t, g);
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) gr[j] = (xr[j] + b_in[g * U + j]) + zrow[g * U + j];
          activate(rec_act, gr, U);
        }
        const T* rr = g_out.at(b, t, 1);
        if (reset_after) {
          const T* xh = x.at(b, t, 2);
          T* ng = g_out.at(b, t, 2);
          const T* inner_h = zrow + 2 * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) ng[j] = (xh[j] + b_in[2 * U + j]) + rr[j] * inner_h[j];
          if (inner_out != nullptr) std::copy(inner_h, inner_h + U, inner_out + (b * steps + t) * U);
        } else {
          const T* hp = h_prev + (b - r0) * ldh;
          const T* mh = rec.present() ? rec.row(t, rec.gate_stride == 0 ? 0 : 2, b) : ones + U;
          T* ar = A + (b - r0) * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) ar[j] = rr[j] * (hp[j] * mh[j]);
        }
      }
      if (!reset_after) {
        if constexpr (std::is_same_v<T, float>) {
          if (panels.packed.present()) gemm_bf16(n, U, A, U, panels.packed, 2, 0, Z + 2 * U, G3, false);
        }
        if (!panels.packed.present()) gemm(n, U, U, A, U, panels.panel(2), U, Z + 2 * U, G3, false);
        for (int64_t b = r0; b < r1; ++b) {
          const T* zrow = Z + (b - r0) * G3;
          const T* xh = x.at(b, t, 2);
          T* ng = g_out.at(b, t, 2);
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) ng[j] = (xh[j] + b_in[2 * U + j]) + zrow[2 * U + j];
        }
      }
      for (int64_t b = r0; b < r1; ++b) {
        T* ng = g_out.at(b, t, 2);
        activate(act, ng, U);
        const T* zg = g_out.at(b, t, 0);
        const T* hp = h_prev + (b - r0) * ldh;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[b * steps + t] : T(1);
        T* hr = h_out + (b * h_slots + t % h_slots) * U;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T fresh = zg[j] * hp[j] + (T(1) - zg[j]) * (ng[j] * u[j]);
          hr[j] = carried(hp[j], fresh, keep[j], vb);
        }
      }
    }
    bf16_release(panels.packed);
  });
}

static CallDims check_gru_forward(const char* fn, const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                  const optional<Tensor>& rbias, const Tensor& h0, const optional<Tensor>& rec_mask,
                                  const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                  const optional<Tensor>& valid, int64_t act, int64_t rec_act, bool reset_after) {
  check_dim(fn, xw, "xw", 4);
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3);
  const CallDims d{fn, B, steps, 3, U, U, 0, call_dtype(fn, xw)};
  check_gates(d, xw, "xw");
  check_panels(d, R, rec_mask, !reset_after);  // reset_before's second product needs the candidate's panel alone
  check_optional(d, input_bias, "input_bias", {3 * U});
  check_optional(d, rbias, "recurrent_bias", {3 * U});
  check_tensor(d, h0, "h0", {B, U});
  check_recurrent_mask(d, rec_mask);
  check_update_mask(d, upd_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", U);
  check_valid(d, valid);
  check_activations(d, act, rec_act);
  return d;
}

std::tuple<Tensor, Tensor> gru_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                       const optional<Tensor>& rbias, const Tensor& h0,
                                       const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                                       const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                                       int64_t rec_act, bool reset_after) {
  const CallDims d = check_gru_forward("droprnn gru_forward", xw, R, input_bias, rbias, h0, rec_mask, upd_mask,
                                       zoneout_h, valid, act, rec_act, reset_after);
  Tensor hs = pooled_empty({d.B, d.T, d.U}, h0.options());
  Tensor inner = pooled_empty({reset_after ? d.B : 0, d.T, d.U}, h0.options());
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_gru_forward", [&] {
    gru_forward_impl<scalar_t>(xw, R, input_bias, rbias, h0, rec_mask, upd_mask, zoneout_h, valid, act, rec_act,
                               reset_after, hs, inner, /*save=*/true);
  });
  return {hs, inner};
}

// The forward with no backward to follow (as lstm_inference): returns h (B, T, U), or (B, U) with
// `all_steps` false.
Tensor gru_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                     const optional<Tensor>& rbias, const Tensor& h0, const optional<Tensor>& rec_mask,
                     const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h, const optional<Tensor>& valid,
                     int64_t act, int64_t rec_act, bool reset_after, bool all_steps) {
  const CallDims d = check_gru_forward("droprnn gru_inference", xw, R, input_bias, rbias, h0, rec_mask, upd_mask,
                                       zoneout_h, valid, act, rec_act, reset_after);
  Tensor hs = pooled_empty({d.B, all_steps ? d.T : 2, d.U}, h0.options());
  Tensor none;
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_gru_inference", [&] {
    gru_forward_impl<scalar_t>(xw, R, input_bias, rbias, h0, rec_mask, upd_mask, zoneout_h, valid, act, rec_act,
                               reset_after, hs, none, /*save=*/false);
  });
  return all_steps ? hs : hs.select(1, (d.T - 1) % 2).contiguous();
}

template <typename T>
static void gru_backward_impl(const Tensor& dhs, const KernelT& RT, const Tensor& KT, const Tensor& x, const Tensor& h0,
                              const Tensor& hs, const Tensor& gates, const Tensor& inner,
                              const optional<Tensor>& input_mask,
                              const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                              const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act,
                              int64_t rec_act, bool reset_after, bool want_dx, const Tensor& dx, Tensor& dK,
                              Tensor& db, Tensor& dR, Tensor& drb, Tensor& dh0, const Tensor& dz) {
  const int64_t B = hs.size(0), steps = hs.size(1), U = hs.size(2), D = x.size(2), G3 = 3 * U;
  const T* dh_in = dhs.data_ptr<T>();
  const T* rt = RT.data<T>();  // (3U, U)
  const T* h_init = h0.data_ptr<T>();
  const T* h_all = hs.data_ptr<T>();
  const GateSeq<T> g_all = gate_seq<T>(gates);  // (B, T, 3, U) in the forward's xw layout
  const T* inner_all = reset_after ? inner.data_ptr<T>() : nullptr;  // (B, T, U)
  InputSide<T> in{x.data_ptr<T>(), KT.data_ptr<T>(), gated_mask<T>(input_mask), D,
                  want_dx ? dx.data_ptr<T>() : nullptr, dK.defined(), db.defined()};
  const bool want_dR = dR.defined(), want_drb = drb.defined();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> no_mask;
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;
  // (B, T, 4U) when asked for: every step's Dz, then the candidate's recurrent-product side -- its output's
  // gradient dn * r (reset_after) or its input a = r * (h * m_h) (reset_before).
  const StepGrads<T> kept = step_grads<T>(dz);

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t wide = std::max(U, D);
  const int64_t per_chunk = rows_max * (U + 2 * G3 + wide + U) + 2 * wide * rows_max + 3 * U;
  Scratch<T> work(chunks * per_chunk);
  // Per-chunk accumulators, summed after the loop: dR (U, 3U), dK (D, 3U), db (3U), d rb (3U).
  const int64_t acc_size = (want_dR ? U * G3 : 0) + (in.want_kernel ? D * G3 : 0) + (in.want_bias ? G3 : 0) +
                           (want_drb ? G3 : 0);
  Scratch<T> acc(chunks * acc_size, true);

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;  // (n, U)
    T* Dz = dh_carry + rows_max * U;                 // (n, 3U) gradients at the projections
    T* Di = Dz + rows_max * G3;                      // (n, 3U) gradients at the recurrent product (reset_after)
    T* tmp = Di + rows_max * G3;                     // (n, max(U, D))
    T* A = tmp + rows_max * wide;                    // (n, U) a = r * (h * m_h) (reset_before)
    T* ST = A + rows_max * U;                        // (2, max(U, D), n) transposed (and masked) blocks
    T* ones = ST + 2 * wide * rows_max;
    std::fill(ones, ones + 2 * U, T(1));
    const Zoneout<T> kh = with_buffer(zh, ones + 2 * U, U);
    T* dR_acc = acc.data() + chunk * acc_size;
    T* dK_acc = dR_acc + (want_dR ? U * G3 : 0);
    T* db_acc = dK_acc + (in.want_kernel ? D * G3 : 0);
    T* drb_acc = db_acc + (in.want_bias ? G3 : 0);
    std::fill(dh_carry, dh_carry + n * U, T(0));
    const MaskColumns<T> rec_columns = want_dR ? mask_columns(rec, 3, r0, r1, U) : MaskColumns<T>{};
    const MaskColumns<T> in_columns = in.want_kernel ? mask_columns(in.mask, 3, r0, r1, D) : MaskColumns<T>{};
    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* h_prev = t == 0 ? h_init + r0 * U : h_all + (r0 * steps + t - 1) * U;
      const int64_t ldh = t == 0 ? U : steps * U;
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t row = b * steps + t;
        const T* hp = h_prev + (b - r0) * ldh;
        const T* zg = g_all.at(b, t, 0);
        const T* rg = g_all.at(b, t, 1);
        const T* ng = g_all.at(b, t, 2);
        const T* inner_h = reset_after ? inner_all + row * U : nullptr;
        const T* dhr = dh_in + row * U;
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* keep = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * U;
        T* dz = Dz + (b - r0) * G3;
        T* dr = dz + U;
        T* dn = dz + 2 * U;
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
          T* di = Di + (b - r0) * G3;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            dr[j] = dn[j] * inner_h[j];  // before r's derivative
            di[2 * U + j] = dn[j] * rg[j];
          }
          scale_by_act_grad(rec_act, dr, rg, U);
          std::copy(dz, dz + 2 * U, di);
        }
      }
      if (!reset_after) {
        // d(a) = dpre_n @ R_h^T, with a = r * (h * m_h); then the r gate and h through a.
        if constexpr (std::is_same_v<T, float>) {
          if (RT.packed.present()) gemm_bf16(n, U, Dz + 2 * U, G3, RT.packed, 2, 0, tmp, U, false);
        }
        if (!RT.packed.present()) gemm(n, U, U, Dz + 2 * U, G3, rt + 2 * U * U, U, tmp, U, false);
        for (int64_t b = r0; b < r1; ++b) {
          const int64_t row = b * steps + t;
          const T* hp = h_prev + (b - r0) * ldh;
          const T* rg = g_all.at(b, t, 1);
          const T* mh = rec.present() ? rec.row(t, rec.gate_stride == 0 ? 0 : 2, b) : ones + U;
          const T* da = tmp + (b - r0) * U;
          T* dr = Dz + (b - r0) * G3 + U;
          T* dhc = dh_carry + (b - r0) * U;
          T* ar = A + (b - r0) * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            const T hm = hp[j] * mh[j];
            dr[j] = da[j] * hm;  // before r's derivative
            dhc[j] += da[j] * rg[j] * mh[j];
            ar[j] = rg[j] * hm;
          }
          scale_by_act_grad(rec_act, dr, rg, U);
        }
      }
      if (kept.present()) {  // Dz, then the candidate's product side: dn * r, or a = r * (h * m_h)
        kept.keep(0, Dz, G3, G3, r0, r1, t);
        kept.keep(G3, reset_after ? Di + 2 * U : A, reset_after ? G3 : U, U, r0, r1, t);
      }
      const T* D_inner = reset_after ? Di : Dz;  // gradients at the recurrent product's output
      const int64_t first = reset_after ? 3 : 2;   // gates in the first recurrent product
      if (want_dR) {
        weight_grad(h_prev, ldh, r0, r1, U, rec, t, D_inner, G3, first, U, dR_acc, G3, ST, rec_columns);
        if (!reset_after) weight_grad(A, U, r0, r1, U, no_mask, t, Dz + 2 * U, G3, 1, U, dR_acc + 2 * U, G3, ST);
      }
      if (want_drb) {
        for (int64_t b = r0; b < r1; ++b) {
          const T* d = D_inner + (b - r0) * G3;
#pragma omp simd
          for (int64_t j = 0; j < G3; ++j) drb_acc[j] += d[j];
        }
      }
      accumulate_input_side(in, Dz, G3, 3, U, r0, r1, t, steps, tmp, ST, dK_acc, db_acc, in_columns);
      product_grad(D_inner, G3, r0, r1, t, first, U, rt, U, rec, tmp, dh_carry, U, true, RT.packed);
    }
    bf16_release(RT.packed);
    std::copy(dh_carry, dh_carry + n * U, dh0.data_ptr<T>() + r0 * U);
  });
  reduce_chunks(acc.data(), chunks, acc_size, {&dR, &dK, &db, &drb});
}

Grads gru_backward(const Tensor& dhs, const Tensor& R, const Tensor& kernel, const Tensor& x, const Tensor& h0,
                   const Tensor& hs, const Tensor& gates, const Tensor& inner, const optional<Tensor>& input_mask,
                   const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                   const optional<Tensor>& zoneout_h, const optional<Tensor>& valid, int64_t act, int64_t rec_act,
                   bool reset_after, bool want_dx, bool want_dkernel, bool want_dbias, bool want_dR, bool want_drb,
                   bool want_dz) {
  const CallDims d = backward_dims("droprnn gru_backward", x, R, kernel, dhs, 3);
  const int64_t U = d.U;
  check_tensor(d, h0, "h0", {d.B, U});
  check_tensor(d, hs, "hs", {d.B, d.T, U});
  check_gates(d, gates, "gates");
  if (reset_after) check_tensor(d, inner, "inner", {d.B, d.T, U});
  check_input_mask(d, input_mask);
  check_recurrent_mask(d, rec_mask);
  check_update_mask(d, upd_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", U);
  check_valid(d, valid);
  check_activations(d, act, rec_act);
  Tensor dx = want_dx ? pooled_empty(x.sizes(), x.options()) : Tensor();
  Tensor dK = want_dkernel ? pooled_empty(kernel.sizes(), kernel.options()) : Tensor();  // contiguous, whatever kernel's strides
  Tensor db = want_dbias ? pooled_empty({3 * U}, x.options()) : Tensor();
  Tensor dR = want_dR ? pooled_empty(R.sizes(), x.options()) : Tensor();
  Tensor drb = want_drb && reset_after ? pooled_empty({3 * U}, x.options()) : Tensor();
  Tensor dh0 = pooled_empty(h0.sizes(), h0.options());
  Tensor dz = deferred_grads(want_dz, x.size(0), x.size(1), 4 * U, x, R);
  const Tensor KT = want_dx ? transposed(kernel) : kernel;  // read for dx only
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "droprnn_gru_backward", [&] {
    gru_backward_impl<scalar_t>(dhs, kernel_transposed(R, 3), KT, x, h0, hs, gates, inner, input_mask,
                                rec_mask, upd_mask, zoneout_h, valid, act, rec_act, reset_after, want_dx, dx, dK, db,
                                dR, drb, dh0, dz);
  });
  return {dx, dK, db, dR, drb, dh0, Tensor(), dz};
}

}  // namespace droprnn
