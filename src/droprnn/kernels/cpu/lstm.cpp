// Fused LSTM recurrence (Keras gate order i, f, c, o), forward and backward. Equals droprnn.cells.LSTMCell
// run by kernels/reference.py, with the same masks:
//
//   z   = xw_t + sum_g (h_{t-1} * m_g) @ R_g          xw_t: input projections incl. bias (one big GEMM outside)
//   i, f, o = rec(z_i, z_f, z_o);  g = act(z_c)
//   c'  = f * c_{t-1} + i * (g * u)                     u: update mask (Semeniuta), else 1
//   h'  = o * act(c')                                   with a projection P (U, H): h' = (o * act(c')) @ P
//   zoneout: s' = d * s_{t-1} + (1 - d) * s'            d: indicator (training) or rate (inference)
//   step mask: s_t = v * s' + (1 - v) * s_{t-1}          v in {0, 1}
//
// Saved for the backward: the activated gates, written over the input projections they came from (in
// xw's layout: no second sequence-sized buffer), and the carried states; act(c') is recomputed (cheaper
// than storing (B, T, U) more). The backward accumulates the weight gradients step by step, in cache.
#include <omp.h>

#include "checks.h"
#include "common.h"

namespace droprnn {

// Everything the forward reads and writes, and the pointwise part of one step for one batch row over a
// range of units -- shared by the two ways of splitting the work over threads below.
template <typename T>
struct LstmForward {
  GateSeq<T> x;
  Panels<T> panels;
  const T* bias;
  const T *h_init, *c_init;
  T *h_out, *c_out;
  GateSeq<T> g_out;  // the activated gates: xw itself, each element overwritten after it is read
  StepMask<T> rec, upd;
  Zoneout<T> zh, zc;
  const T* v;
  const T* proj;  // (U, H), or null: h is o * act(c') itself
  int64_t B, steps, U, H, act, rec_act;
  // Training keeps every step's h and c (h_slots = c_slots = steps) and the gates; inference keeps what the
  // recurrence reads: c in place (1 slot), h in 2 alternating slots unless every output is wanted.
  int64_t h_slots, c_slots;
  bool save_gates;

  T* h_at(int64_t b, int64_t t) const { return h_out + (b * h_slots + t % h_slots) * H; }
  T* c_at(int64_t b, int64_t t) const { return c_out + (b * c_slots + t % c_slots) * U; }

  // Per-thread constants: the update mask and input bias when absent, zoneout weights (see Zoneout).
  struct Locals {
    std::vector<T> buffer;
    const T *ones, *b_in;
    Zoneout<T> kh, kc;
  };
  Locals locals() const {
    Locals l;
    l.buffer.assign(static_cast<size_t>(7 * U), T(0));
    T* ones = l.buffer.data();
    std::fill(ones, ones + U, T(1));
    l.ones = ones;
    l.kh = with_buffer(zh, ones + U, U);
    l.kc = with_buffer(zc, ones + 2 * U, U);
    l.b_in = bias ? bias : ones + 3 * U;  // zeros
    return l;
  }

  // Row b at step t, units [j0, j0 + w): z holds the recurrent products of the four gates, gate g at
  // z + g * zs; hp / cp are the row's previous states. tcr is scratch (w).
  // With a projection, o * act(c') goes to r (the row's U values) and h is formed by mix_h after the product.
  void row(int64_t b, int64_t t, T* z, int64_t zs, int64_t j0, int64_t w, const T* hp, const T* cp, T* tcr,
           const Locals& l, T* r = nullptr) const {
    const int64_t row = b * steps + t;
    for (int64_t g = 0; g < 4; ++g) {
      const T* xr = x.at(b, t, g) + j0;
      const T* bg = l.b_in + g * U + j0;
      T* zg = z + g * zs;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) zg[j] += xr[j] + bg[j];  // (x K + b) + h R, as the reference adds
    }
    T *ig = z, *fg = z + zs, *gg = z + 2 * zs, *og = z + 3 * zs;
    activate(rec_act, ig, w);
    activate(rec_act, fg, w);
    activate(act, gg, w);
    activate(rec_act, og, w);
    if (save_gates) {
      for (int64_t g = 0; g < 4; ++g) std::copy(z + g * zs, z + g * zs + w, g_out.at(b, t, g) + j0);
    }
    const T* u = (upd.present() ? upd.row(t, 0, b) : l.ones) + j0;
    const T* dh = l.kh.row(t, b) + j0;
    const T* dc = l.kc.row(t, b) + j0;
    T* cr = c_at(b, t) + j0;  // may be cp itself (one slot): each element is read before it is written
    T* hr = h_at(b, t) + j0;
    const T vb = v ? v[row] : T(1);
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T fresh = fg[j] * cp[j] + ig[j] * (gg[j] * u[j]);
      cr[j] = carried(cp[j], fresh, dc[j], vb);
      tcr[j] = fresh;
    }
    activate(act, tcr, w);  // now act(c')
    if (r != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) r[j] = og[j] * tcr[j];
      return;
    }
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) hr[j] = carried(hp[j], og[j] * tcr[j], dh[j], vb);
  }

  // Row b's h at step t from its projected fresh value (H), through zoneout and the step mask.
  void mix_h(int64_t b, int64_t t, const T* fresh, const Locals& l) const {
    const T* dh = l.kh.row(t, b);
    const T* hp = h_prev(b, t);
    T* hr = h_at(b, t);
    const T vb = v ? v[b * steps + t] : T(1);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) hr[j] = carried(hp[j], fresh[j], dh[j], vb);
  }

  const T* h_prev(int64_t b, int64_t t) const { return t == 0 ? h_init + b * H : h_at(b, t - 1); }
  const T* c_prev(int64_t b, int64_t t) const { return t == 0 ? c_init + b * U : c_at(b, t - 1); }
  int64_t h_ld(int64_t t) const { return t == 0 ? H : h_slots * H; }

  // Each thread owns a slice of the batch and runs every step for it: no synchronisation at all.
  void by_batch() const {
    const int64_t chunks = batch_chunks(B), rows_max = (B + chunks - 1) / chunks, G4 = 4 * U;
    // Work buffers, one set per chunk, allocated once per call (never inside the time loop).
    const int64_t per_chunk = rows_max * (G4 + H) + U + (proj ? rows_max * (U + H) : 0);
    Scratch<T> work(chunks * per_chunk);
    for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
      T* Z = work.data() + chunk * per_chunk;  // (n, 4U) recurrent products, then gates
      T* A = Z + rows_max * G4;                 // (n, H) masked h_{t-1}
      T* tcr = A + rows_max * H;                // (U,) one row's c', then act(c')
      T* Rw = tcr + U;                          // with a projection: (n, U) o * act(c'), then (n, H) its product
      T* Hf = Rw + rows_max * U;
      const Locals l = locals();
      for (int64_t t = 0; t < steps; ++t) {
        recurrent_product(h_prev(r0, t), h_ld(t), r0, r1, rec, t, panels, panels.count, A, Z, G4);
        for (int64_t b = r0; b < r1; ++b) {
          row(b, t, Z + (b - r0) * G4, U, 0, U, h_prev(b, t), c_prev(b, t), tcr, l, proj ? Rw + (b - r0) * U : nullptr);
        }
        if (proj) {
          gemm(r1 - r0, H, U, Rw, U, proj, H, Hf, H, false);
          for (int64_t b = r0; b < r1; ++b) mix_h(b, t, Hf + (b - r0) * H, l);
        }
      }
      bf16_release(panels.packed);
    });
  }

  // Each thread owns a slice of the units and runs every row for it, meeting the others at a barrier
  // after each step (every thread reads all of h_{t-1}): batches smaller than the thread count still use
  // every thread.
  void by_units() const {
    const int64_t G4 = 4 * U;
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const FlushSubnormals flush;
      const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
      // Slices of whole 16-unit vectors (the last takes the rest); of whole packed blocks for bfloat16
      // products, which start a product at a block.
      const int64_t slice = panels.packed.present() ? kBf16Block : 16;
      const int64_t vectors = (U + slice - 1) / slice;
      const int64_t j0 = std::min(U, vectors * me / team * slice), j1 = std::min(U, vectors * (me + 1) / team * slice);
      const int64_t w = j1 - j0;
      std::vector<T> work(static_cast<size_t>(B * 4 * std::max<int64_t>(w, 1) + B * H + std::max<int64_t>(w, 1)));
      T* Z = work.data();           // (B, 4w): the recurrent products of this thread's units, gate-blocked
      T* A = Z + B * 4 * w;          // (B, H) masked h_{t-1}, for all rows
      T* tcr = A + B * H;            // (w,)
      const Locals l = locals();
      for (int64_t t = 0; t < steps; ++t) {
        if (w > 0) {
          const T* hp0 = h_prev(0, t);
          const int64_t ldh = h_ld(t);
          for (int64_t g = 0; g < 4; ++g) {
            const T* a = hp0;
            int64_t lda = ldh;
            if (rec.present() && (g == 0 || rec.gate_stride != 0)) masked_rows(hp0, ldh, 0, B, H, rec, t, g, A);
            if (rec.present()) a = A, lda = H;
            if constexpr (std::is_same_v<T, float>) {
              if (panels.packed.present()) {  // h rounded once per distinct mask
                uint16_t* a16 = bf16_rows(B, panels.packed.Kp);
                if (g == 0 || rec.gate_stride != 0) round_rows(B, H, panels.packed.Kp, a, lda, a16);
                gemm_bf16_rounded(B, w, a16, panels.packed, g, j0, Z + g * w, 4 * w, false);
                continue;
              }
            }
            const T* panel = panels.count == 1 ? panels.panel(0) + g * U : panels.panel(g);
            gemm(B, w, H, a, lda, panel + j0, panels.N, Z + g * w, 4 * w, false);
          }
          for (int64_t b = 0; b < B; ++b)
            row(b, t, Z + b * 4 * w, w, j0, w, h_prev(b, t) + j0, c_prev(b, t) + j0, tcr, l);
        }
#pragma omp barrier
      }
      bf16_release(panels.packed);
    }
  }
};

template <typename T>
static void lstm_forward_impl(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias, const Tensor& h0,
                              const Tensor& c0, const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                              const optional<Tensor>& zoneout_h, const optional<Tensor>& zoneout_c,
                              const optional<Tensor>& valid, const optional<Tensor>& projection, int64_t act,
                              int64_t rec_act, Tensor& hs, Tensor& cs, bool save_gates) {
  const T* proj = projection.has_value() && projection->defined() ? projection->data_ptr<T>() : nullptr;
  LstmForward<T> f{
      gate_seq<T>(xw), panels_of<T>(R, 4),
      input_bias.has_value() && input_bias->defined() ? input_bias->data_ptr<T>() : nullptr,
      h0.data_ptr<T>(), c0.data_ptr<T>(), hs.data_ptr<T>(), cs.data_ptr<T>(), gate_seq<T>(xw),
      gated_mask<T>(rec_mask), plain_mask<T>(upd_mask), zoneout_of<T>(zoneout_h), zoneout_of<T>(zoneout_c),
      valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr, proj,
      xw.size(0), xw.size(1), xw.size(3), h0.size(1), act, rec_act, hs.size(1), cs.size(1), save_gates};
  // Units split only for batches smaller than the thread count: measured here it is 1.8x faster at batch
  // 1 on 2 threads, and no faster than the batch split at (128, 50, 256, 512), where a thread's share of a
  // 4 MiB recurrent kernel still does not stay in a 2 MiB L2. A projection needs every unit of a row.
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && !at::in_parallel_region() && f.B < threads && proj == nullptr) {
    f.by_units();
  } else {
    f.by_batch();
  }
}

// Checks what a forward reads; its sizes.
static CallDims check_lstm_forward(const char* fn, const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                   const Tensor& h0, const Tensor& c0, const optional<Tensor>& rec_mask,
                                   const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                   const optional<Tensor>& zoneout_c, const optional<Tensor>& valid,
                                   const optional<Tensor>& projection, int64_t act, int64_t rec_act) {
  check_dim(fn, xw, "xw", 4);
  check_dim(fn, h0, "h0", 2);
  const int64_t B = xw.size(0), steps = xw.size(1), U = xw.size(3), H = h0.size(1);
  const CallDims d{fn, B, steps, 4, U, H, 0, call_dtype(fn, xw)};
  check_projection(d, R, projection);
  check_gates(d, xw, "xw");
  check_panels(d, R, rec_mask, false);
  check_optional(d, input_bias, "input_bias", {4 * U});
  check_tensor(d, h0, "h0", {B, H});
  check_tensor(d, c0, "c0", {B, U});
  check_recurrent_mask(d, rec_mask);
  check_update_mask(d, upd_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", H);
  check_zoneout(d, zoneout_c, "zoneout_c", U);
  check_valid(d, valid);
  check_activations(d, act, rec_act);
  return d;
}

std::tuple<Tensor, Tensor> lstm_forward(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                        const Tensor& h0, const Tensor& c0, const optional<Tensor>& rec_mask,
                                        const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                        const optional<Tensor>& zoneout_c, const optional<Tensor>& valid, int64_t act,
                                        int64_t rec_act, const optional<Tensor>& projection) {
  const CallDims d = check_lstm_forward("droprnn lstm_forward", xw, R, input_bias, h0, c0, rec_mask, upd_mask,
                                        zoneout_h, zoneout_c, valid, projection, act, rec_act);
  Tensor hs = pooled_empty({d.B, d.T, d.H}, h0.options());
  Tensor cs = pooled_empty({d.B, d.T, d.U}, h0.options());
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_lstm_forward", [&] {
    lstm_forward_impl<scalar_t>(xw, R, input_bias, h0, c0, rec_mask, upd_mask, zoneout_h, zoneout_c, valid,
                                projection, act, rec_act, hs, cs, /*save_gates=*/true);
  });
  return {hs, cs};
}

// The forward with no backward to follow: nothing is kept for one (the gates stay in cache; c is updated in
// place), and with `all_steps` false only the last h is returned, the steps alternating between two rows
// of h. Returns (h (B, T, H) or (B, H), the last c (B, U)).
std::tuple<Tensor, Tensor> lstm_inference(const Tensor& xw, const Tensor& R, const optional<Tensor>& input_bias,
                                          const Tensor& h0, const Tensor& c0, const optional<Tensor>& rec_mask,
                                          const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                                          const optional<Tensor>& zoneout_c, const optional<Tensor>& valid,
                                          int64_t act, int64_t rec_act, bool all_steps,
                                          const optional<Tensor>& projection) {
  const CallDims d = check_lstm_forward("droprnn lstm_inference", xw, R, input_bias, h0, c0, rec_mask, upd_mask,
                                        zoneout_h, zoneout_c, valid, projection, act, rec_act);
  Tensor hs = pooled_empty({d.B, all_steps ? d.T : 2, d.H}, h0.options());
  Tensor cs = pooled_empty({d.B, 1, d.U}, h0.options());
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "droprnn_lstm_inference", [&] {
    lstm_forward_impl<scalar_t>(xw, R, input_bias, h0, c0, rec_mask, upd_mask, zoneout_h, zoneout_c, valid,
                                projection, act, rec_act, hs, cs, /*save_gates=*/false);
  });
  return {all_steps ? hs : hs.select(1, (d.T - 1) % 2).contiguous(), cs.select(1, 0)};
}

template <typename T>
static void lstm_backward_impl(const Tensor& dhs, const Tensor& dc_last, const KernelT& RT, const Tensor& KT,
                               const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs,
                               const Tensor& gates, const optional<Tensor>& input_mask,
                               const optional<Tensor>& rec_mask, const optional<Tensor>& upd_mask,
                               const optional<Tensor>& zoneout_h, const optional<Tensor>& zoneout_c,
                               const optional<Tensor>& valid, const Tensor& PT, int64_t act, int64_t rec_act,
                               bool want_dx, const Tensor& dx, Tensor& dK, Tensor& db, Tensor& dR, Tensor& dP,
                               Tensor& dh0, Tensor& dc0, const Tensor& dz) {
  const int64_t B = cs.size(0), steps = cs.size(1), U = cs.size(2), H = hs.size(2), D = x.size(2), G4 = 4 * U;
  const T* dh_in = dhs.data_ptr<T>();
  const T* dc_end = dc_last.data_ptr<T>();  // (B, U): dL/dc at the last step, the only c the caller sees
  const T* rt = RT.data<T>();                // (4U, H): R transposed, so each gate block is a row block
  const T* h_init = h0.data_ptr<T>();
  const T* h_all = hs.data_ptr<T>();
  const T* c_init = c0.data_ptr<T>();
  const T* c_all = cs.data_ptr<T>();
  const GateSeq<T> g_all = gate_seq<T>(gates);  // (B, T, 4, U) in the forward's xw layout
  InputSide<T> in{x.data_ptr<T>(), KT.data_ptr<T>(), gated_mask<T>(input_mask), D,
                  want_dx ? dx.data_ptr<T>() : nullptr, dK.defined(), db.defined()};
  const bool want_dR = dR.defined();
  const StepMask<T> rec = gated_mask<T>(rec_mask);
  const StepMask<T> upd = plain_mask<T>(upd_mask);
  const Zoneout<T> zh = zoneout_of<T>(zoneout_h), zc = zoneout_of<T>(zoneout_c);
  const T* v = valid.has_value() && valid->defined() ? valid->data_ptr<T>() : nullptr;
  const StepGrads<T> kept = step_grads<T>(dz);

  const T* pt = PT.defined() ? PT.data_ptr<T>() : nullptr;  // (H, U): the projection transposed, or null
  const bool want_dP = dP.defined();

  const int64_t chunks = batch_chunks(B);
  const int64_t rows_max = (B + chunks - 1) / chunks;
  const int64_t wide = std::max({H, D, pt ? U : int64_t(0)});
  const int64_t per_chunk =
      rows_max * (H + U + G4 + wide) + 2 * wide * rows_max + 5 * U + (pt ? rows_max * (3 * U + H) : 0);
  Scratch<T> work(chunks * per_chunk);
  // Per-chunk weight-gradient accumulators, summed after the loop: dR (H, 4U), dK (D, 4U), db (4U), dP (U, H).
  const int64_t acc_size = (want_dR ? H * G4 : 0) + (in.want_kernel ? D * G4 : 0) + (in.want_bias ? G4 : 0) +
                           (want_dP ? U * H : 0);
  Scratch<T> acc(chunks * acc_size, true);

  for_each_batch_chunk(B, [&](int64_t r0, int64_t r1, int64_t chunk) {
    const int64_t n = r1 - r0;
    T* dh_carry = work.data() + chunk * per_chunk;  // (n, H): dL/dh_t flowing to step t-1
    T* dc_carry = dh_carry + rows_max * H;           // (n, U)
    T* Dz = dc_carry + rows_max * U;                 // (n, 4U) gradients at the gate pre-activations
    T* tmp = Dz + rows_max * G4;                     // (n, max(H, D)) a product before masking
    T* ST = tmp + rows_max * wide;                   // (2, max(H, D), n) transposed (and masked) blocks
    T* dtc = ST + 2 * wide * rows_max;               // (U,) one row's d act(c')
    T* tcr = dtc + U;                                // (U,) one row's act(c'), recomputed
    T* ones = tcr + U;
    // With a projection: per row, act(c') (TC) and o * act(c') (Rw), the gradient at the projection's output
    // (DHN, n × H) and at its input (DR, n × U).
    T* TC = ones + 3 * U;
    T* Rw = TC + rows_max * U;
    T* DR = Rw + rows_max * U;
    T* DHN = DR + rows_max * U;
    std::fill(ones, ones + U, T(1));
    const Zoneout<T> kh = with_buffer(zh, ones + U, U), kc = with_buffer(zc, ones + 2 * U, U);
    T* dR_acc = acc.data() + chunk * acc_size;
    T* dK_acc = dR_acc + (want_dR ? H * G4 : 0);
    T* db_acc = dK_acc + (in.want_kernel ? D * G4 : 0);
    T* dP_acc = db_acc + (in.want_bias ? G4 : 0);
    std::fill(dh_carry, dh_carry + n * H, T(0));
    std::copy(dc_end + r0 * U, dc_end + r1 * U, dc_carry);
    const MaskColumns<T> rec_columns = want_dR ? mask_columns(rec, 4, r0, r1, H) : MaskColumns<T>{};
    const MaskColumns<T> in_columns = in.want_kernel ? mask_columns(in.mask, 4, r0, r1, D) : MaskColumns<T>{};
    for (int64_t t = steps - 1; t >= 0; --t) {
      // The gradients at the gate pre-activations of row b, from d(o * act(c')) already turned into d o
      // (in dzo) and d act(c') (in dtc): the cell-state side of the step, shared by both forms below.
      auto c_side = [&](int64_t b, const T* tc, T* dtc) {
        const int64_t row = b * steps + t;
        const T* cp = t == 0 ? c_init + b * U : c_all + (row - 1) * U;
        const T* ig = g_all.at(b, t, 0);
        const T* fg = g_all.at(b, t, 1);
        const T* gg = g_all.at(b, t, 2);
        const T* og = g_all.at(b, t, 3);
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
        const T* dzc = kc.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dcc = dc_carry + (b - r0) * U;
        T* dzi = Dz + (b - r0) * G4;
        T* dzf = dzi + U;
        T* dzg = dzi + 2 * U;
        T* dzo = dzi + 3 * U;
        scale_by_act_grad(act, dtc, tc, U);
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) {
          const T Dc = dcc[j];
          const T dC = vb * Dc;
          const T dc_new = (T(1) - dzc[j]) * dC + dtc[j];
          dzi[j] = dc_new * (gg[j] * u[j]);
          dzf[j] = dc_new * cp[j];
          dzg[j] = dc_new * ig[j] * u[j];
          dcc[j] = (T(1) - vb) * Dc + dzc[j] * dC + dc_new * fg[j];
        }
        scale_by_act_grad(rec_act, dzi, ig, U);
        scale_by_act_grad(rec_act, dzf, fg, U);
        scale_by_act_grad(act, dzg, gg, U);
        scale_by_act_grad(rec_act, dzo, og, U);
      };
      // act(c') of row b, recomputed from the saved gates and c_{t-1} as the forward formed it.
      auto cell_output = [&](int64_t b, T* tc) {
        const int64_t row = b * steps + t;
        const T* cp = t == 0 ? c_init + b * U : c_all + (row - 1) * U;
        const T* ig = g_all.at(b, t, 0);
        const T* fg = g_all.at(b, t, 1);
        const T* gg = g_all.at(b, t, 2);
        const T* u = upd.present() ? upd.row(t, 0, b) : ones;
#pragma omp simd
        for (int64_t j = 0; j < U; ++j) tc[j] = fg[j] * cp[j] + ig[j] * (gg[j] * u[j]);
        activate(act, tc, U);
      };
      // h's side of row b: dh_new (the gradient at the fresh h, width H) into out, the carry updated.
      auto h_side = [&](int64_t b, T* out) {
        const int64_t row = b * steps + t;
        const T* dhr = dh_in + row * H;
        const T* dzh = kh.row(t, b);
        const T vb = v ? v[row] : T(1);
        T* dhc = dh_carry + (b - r0) * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T Dh = dhr[j] + dhc[j];
          const T dH = vb * Dh;
          out[j] = (T(1) - dzh[j]) * dH;
          dhc[j] = (T(1) - vb) * Dh + dzh[j] * dH;  // the recurrent product adds its part below
        }
      };
      if (pt != nullptr) {  // h' = (o * act(c')) @ P: the gradient crosses the projection for all rows at once
        for (int64_t b = r0; b < r1; ++b) {
          T* tc = TC + (b - r0) * U;
          T* r = Rw + (b - r0) * U;
          const T* og = g_all.at(b, t, 3);
          cell_output(b, tc);
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) r[j] = og[j] * tc[j];
          h_side(b, DHN + (b - r0) * H);
        }
        gemm(r1 - r0, U, H, DHN, H, pt, U, DR, U, false);
        if (want_dP) weight_grad(Rw, U, r0, r1, U, StepMask<T>{}, t, DHN, H, 1, H, dP_acc, H, ST);
        for (int64_t b = r0; b < r1; ++b) {
          const T* tc = TC + (b - r0) * U;
          const T* dr = DR + (b - r0) * U;
          const T* og = g_all.at(b, t, 3);
          T* dzo = Dz + (b - r0) * G4 + 3 * U;
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            dzo[j] = dr[j] * tc[j];  // d o, before o's derivative
            dtc[j] = dr[j] * og[j];  // d act(c'), before act's derivative
          }
          c_side(b, tc, dtc);
        }
      } else {
        for (int64_t b = r0; b < r1; ++b) {
          const T* og = g_all.at(b, t, 3);
          T* dzo = Dz + (b - r0) * G4 + 3 * U;
          cell_output(b, tcr);
          h_side(b, dtc);  // dh_new, then (below) d act(c') in place
#pragma omp simd
          for (int64_t j = 0; j < U; ++j) {
            const T dh_new = dtc[j];
            dzo[j] = dh_new * tcr[j];
            dtc[j] = dh_new * og[j];
          }
          c_side(b, tcr, dtc);
        }
      }
      if (kept.present()) kept.keep(0, Dz, G4, G4, r0, r1, t);
      const T* h_prev = t == 0 ? h_init + r0 * H : h_all + (r0 * steps + t - 1) * H;
      const int64_t ldh = t == 0 ? H : steps * H;
      if (want_dR) weight_grad(h_prev, ldh, r0, r1, H, rec, t, Dz, G4, 4, U, dR_acc, G4, ST, rec_columns);
      accumulate_input_side(in, Dz, G4, 4, U, r0, r1, t, steps, tmp, ST, dK_acc, db_acc, in_columns);
      product_grad(Dz, G4, r0, r1, t, 4, U, rt, H, rec, tmp, dh_carry, H, true, RT.packed);
    }
    bf16_release(RT.packed);
    std::copy(dh_carry, dh_carry + n * H, dh0.data_ptr<T>() + r0 * H);
    std::copy(dc_carry, dc_carry + n * U, dc0.data_ptr<T>() + r0 * U);
  });
  reduce_chunks(acc.data(), chunks, acc_size, {&dR, &dK, &db, &dP});
}

Grads lstm_backward(const Tensor& dhs, const Tensor& dc_last, const Tensor& R, const Tensor& kernel, const Tensor& x,
                    const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs, const Tensor& gates,
                    const optional<Tensor>& input_mask, const optional<Tensor>& rec_mask,
                    const optional<Tensor>& upd_mask, const optional<Tensor>& zoneout_h,
                    const optional<Tensor>& zoneout_c, const optional<Tensor>& valid, int64_t act, int64_t rec_act,
                    bool want_dx, bool want_dkernel, bool want_dbias, bool want_dR, bool want_dz,
                    const optional<Tensor>& projection) {
  const bool projected = projection.has_value() && projection->defined();
  const CallDims d = backward_dims("droprnn lstm_backward", x, R, kernel, dhs, 4, projected);
  check_projection(d, R, projection);
  const int64_t U = d.U;
  check_tensor(d, dc_last, "dc_last", {d.B, U});
  check_tensor(d, h0, "h0", {d.B, d.H});
  check_tensor(d, c0, "c0", {d.B, U});
  check_tensor(d, hs, "hs", {d.B, d.T, d.H});
  check_tensor(d, cs, "cs", {d.B, d.T, U});
  check_gates(d, gates, "gates");
  check_input_mask(d, input_mask);
  check_recurrent_mask(d, rec_mask);
  check_update_mask(d, upd_mask);
  check_zoneout(d, zoneout_h, "zoneout_h", d.H);
  check_zoneout(d, zoneout_c, "zoneout_c", U);
  check_valid(d, valid);
  check_activations(d, act, rec_act);
  Tensor dx = want_dx ? pooled_empty(x.sizes(), x.options()) : Tensor();
  Tensor dK = want_dkernel ? pooled_empty(kernel.sizes(), kernel.options()) : Tensor();  // contiguous, whatever kernel's strides
  Tensor db = want_dbias ? pooled_empty({kernel.size(1)}, x.options()) : Tensor();
  Tensor dR = want_dR ? pooled_empty(R.sizes(), x.options()) : Tensor();
  Tensor dP = projected ? pooled_empty(projection->sizes(), x.options()) : Tensor();
  Tensor dh0 = pooled_empty(h0.sizes(), h0.options());
  Tensor dc0 = pooled_empty(c0.sizes(), c0.options());
  Tensor dz = deferred_grads(want_dz, x.size(0), x.size(1), kernel.size(1), x, R);
  const Tensor KT = want_dx ? transposed(kernel) : kernel;  // read for dx only
  const Tensor PT = projected ? transposed(*projection) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "droprnn_lstm_backward", [&] {
    lstm_backward_impl<scalar_t>(dhs, dc_last, kernel_transposed(R, 4), KT, x, h0, c0, hs, cs, gates,
                                 input_mask, rec_mask, upd_mask, zoneout_h, zoneout_c, valid, PT, act, rec_act,
                                 want_dx, dx, dK, db, dR, dP, dh0, dc0, dz);
  });
  // The fifth slot holds the cell's extra parameter's gradient: the GRU's recurrent bias, here the projection.
  return {dx, dK, db, dR, dP, dh0, dc0, dz};
}

}  // namespace droprnn
