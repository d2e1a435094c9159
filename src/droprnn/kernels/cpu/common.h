// Shared pieces of droprnn's fused CPU recurrences: the per-step GEMM, activations, mask access and
// the split of the batch over threads. Each cell's forward and backward live in their own file.
//
// Layout: batch-major, (B, T, F) for every per-step tensor, so outputs are directly the layer's
// return_sequences layout. A thread owns a slice of batch rows and runs every timestep for it: no
// synchronisation per step. Inside the time loop there is no allocation and no ATen call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "bf16.h"

namespace droprnn {

using at::Tensor;
using c10::optional;

// What every backward returns: d x, d kernel, d input bias, d recurrent kernel, d recurrent bias (GRU),
// d h0, d c0 (LSTM), and the gate gradients of every step dz (B, T, G·U) when asked for (want_dz: the
// caller forms the weight gradients from them in large products; the GRU's has a fourth block, see
// gru.cpp); undefined (None in Python) where not wanted or not applicable.
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------------------------- memory
// at::empty, but blocks of 1 MiB and more come from a cache reused across calls (pool.cpp).
Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// A work buffer of n values from the same cache, zeroed on request; returned to it on destruction.
template <typename T>
struct Scratch {
  Tensor block;
  explicit Scratch(int64_t n, bool zeroed = false)
      : block(pooled_empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))) {
    if (zeroed) std::fill(data(), data() + block.numel(), T(0));
  }
  T* data() const { return block.data_ptr<T>(); }
};

// W^T (N, M) as a contiguous tensor, for the backward's products that read a kernel's transpose row by row.
// W.t().contiguous() walks one side with a stride and misses the cache at every element (3.2 ms for a
// 650 x 2600 kernel, measured); tiles of kTile x kTile keep both sides in cache. W.t() itself where that
// is contiguous already (a transposed view, as droprnn.nn passes torch's layout).
inline Tensor transposed(const Tensor& W) {
  if (W.t().is_contiguous()) return W.t();
  const Tensor src = W.contiguous();
  const int64_t rows = src.size(0), cols = src.size(1);
  Tensor out = pooled_empty({cols, rows}, src.options());
  constexpr int64_t kTile = 32;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "droprnn_transposed", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i0 = begin * kTile; i0 < std::min(rows, end * kTile); i0 += kTile) {
        const int64_t i1 = std::min(rows, i0 + kTile);
        for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
          const int64_t j1 = std::min(cols, j0 + kTile);
          for (int64_t j = j0; j < j1; ++j) {
            for (int64_t i = i0; i < i1; ++i) o[j * rows + i] = s[i * cols + j];
          }
        }
      }
    });
  });
  return out;
}

// The recurrent kernel R (H, G·U) as a backward reads it: transposed (G·U, H) in the call's dtype, or, when
// R is bfloat16 (bfloat16 products), packed one transposed matrix (U, H) per gate.
struct KernelT {
  Tensor plain;
  PackedBf16 packed;
  template <typename T>
  const T* data() const { return plain.defined() ? plain.data_ptr<T>() : nullptr; }
};

inline KernelT kernel_transposed(const Tensor& R, int64_t gates) {
  if (R.scalar_type() == at::kBFloat16) return {Tensor(), pack_gates_bf16(R, gates, true)};
  return {transposed(R), PackedBf16{}};
}

// ---------------------------------------------------------------------------------------------- GEMM
// C (M, N) = [C +] A (M, K) @ B (K, N), row-major with leading dimensions. float goes through PyTorch's
// brgemm micro-kernel (oneDNN): in measurements on the per-step shapes it beat MKL sgemm, packed GEMM
// and ATen bmm. double has no brgemm: a plain loop, vectorised over N (float64 is for verification).
// Large products are cut into blocks along N and K: a block of B stays in L2 while every row of A passes over
// it (measured on a Xeon with 2 MiB of L2, 256 x 256 blocks: ~165 GFLOP/s per core at (64, 512, 512) against
// ~135 unblocked). The side comes from this machine's L2 (kernels/cpu/machine.py sets it at load).
inline int64_t& gemm_block() {
  static int64_t side = 256;
  return side;
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  if (M == 0) return;  // an empty batch: oneDNN's brgemm throws std::bad_alloc for M == 0, aborting the process
  const int64_t block = gemm_block();
  for (int64_t j = 0; j < N; j += block) {
    const int64_t nb = std::min(block, N - j);
    for (int64_t k = 0; k < K; k += block) {
      const int64_t kb = std::min(block, K - k);
      at::native::cpublas::brgemm(M, nb, kb, lda, ldb, ldc, accumulate || k > 0, A + k, B + k * ldb + j, C + j, false);
    }
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------- activations
// Codes shared with kernels/fused.py.
enum Act : int64_t { TANH = 0, SIGMOID = 1, HARD_SIGMOID = 2, RELU = 3, LINEAR = 4 };

// exp for float without a libm call, so activation loops vectorise (Cephes expf: ~1 ulp on [-88, 88]).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float tanh_approx(float x) {
  // Cephes tanhf: an odd polynomial near 0 (keeps relative accuracy for tiny x), 1 - 2/(e^{2|x|}+1) beyond.
  const float ax = std::fabs(x);
  const float z = x * x;
  float poly = -5.70498872745e-3f;
  poly = poly * z + 2.06390887954e-2f;
  poly = poly * z - 5.37397155531e-2f;
  poly = poly * z + 1.33314422036e-1f;
  poly = poly * z - 3.33332819422e-1f;
  const float small = x + x * z * poly;
  const float big = 1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f);
  return ax < 0.625f ? small : std::copysign(big, x);
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

inline float act_value(int64_t act, float x) {
  switch (act) {
    case TANH: return tanh_approx(x);
    case SIGMOID: return sigmoid_approx(x);
    case HARD_SIGMOID: return std::min(std::max(x + 3.0f, 0.0f), 6.0f) / 6.0f;
    case RELU: return std::max(x, 0.0f);
    default: return x;
  }
}

inline double act_value(int64_t act, double x) {
  switch (act) {
    case TANH: return std::tanh(x);
    case SIGMOID: return 1.0 / (1.0 + std::exp(-x));
    case HARD_SIGMOID: return std::min(std::max(x + 3.0, 0.0), 6.0) / 6.0;
    case RELU: return std::max(x, 0.0);
    default: return x;
  }
}

// In place over n values; the switch sits outside the loop so each loop vectorises.
template <typename T>
inline void activate(int64_t act, T* x, int64_t n) {
  switch (act) {
    case TANH:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) x[j] = act_value(TANH, x[j]);
      break;
    case SIGMOID:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) x[j] = act_value(SIGMOID, x[j]);
      break;
    case HARD_SIGMOID:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) x[j] = act_value(HARD_SIGMOID, x[j]);
      break;
    case RELU:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) x[j] = act_value(RELU, x[j]);
      break;
    default:
      break;
  }
}

// dx[j] *= act'(x[j]), the derivative written in terms of the activation's output y = act(x).
template <typename T>
inline void scale_by_act_grad(int64_t act, T* dx, const T* y, int64_t n) {
  switch (act) {
    case TANH:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] *= T(1) - y[j] * y[j];
      break;
    case SIGMOID:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] *= y[j] * (T(1) - y[j]);
      break;
    case HARD_SIGMOID:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] *= (y[j] > T(0) && y[j] < T(1)) ? T(1) / T(6) : T(0);
      break;
    case RELU:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] *= y[j] > T(0) ? T(1) : T(0);
      break;
    default:
      break;
  }
}

// A carried state after zoneout (keep: the keep-old weight, an indicator in training, the rate in
// inference) and the step mask (vb in {0, 1}: a masked step keeps the old state). Elementwise, so that the
// loops calling it stay fused and vectorised; the result may overwrite old (read first).
template <typename T>
inline T carried(T old, T fresh, T keep, T vb) {
  const T zoned = keep * old + (T(1) - keep) * fresh;
  return vb * zoned + (T(1) - vb) * old;
}

// ---------------------------------------------------------------------------------------------- masks
// A mask that may be per sequence or per step: element (t, [gate,] b, j) of a tensor shaped
// (m, B, F) or (T, m, B, F) (gate axis present for recurrent masks), or (B, F) / (T, B, F).
template <typename T>
struct StepMask {
  const T* data = nullptr;
  int64_t step_stride = 0;   // 0 when one mask serves every step
  int64_t gate_stride = 0;   // 0 when one mask serves every gate
  int64_t row_stride = 0;
  bool present() const { return data != nullptr; }
  const T* row(int64_t t, int64_t gate, int64_t b) const {
    return data + t * step_stride + gate * gate_stride + b * row_stride;
  }
};

// masks: None, (m, B, F), or (T, m, B, F) -- gated (recurrent) masks.
template <typename T>
StepMask<T> gated_mask(const optional<Tensor>& mask) {
  StepMask<T> m;
  if (!mask.has_value() || !mask->defined()) return m;
  const Tensor& x = *mask;
  m.data = x.data_ptr<T>();
  const bool timed = x.dim() == 4;
  const int64_t gates = x.size(timed ? 1 : 0);
  m.step_stride = timed ? x.stride(0) : 0;
  m.gate_stride = gates > 1 ? x.stride(timed ? 1 : 0) : 0;
  m.row_stride = x.stride(timed ? 2 : 1);
  return m;
}

// masks: None, (B, F), or (T, B, F) -- ungated masks (update masks, zoneout indicators).
template <typename T>
StepMask<T> plain_mask(const optional<Tensor>& mask) {
  StepMask<T> m;
  if (!mask.has_value() || !mask->defined() || mask->dim() == 0) return m;
  const Tensor& x = *mask;
  m.data = x.data_ptr<T>();
  const bool timed = x.dim() == 3;
  m.step_stride = timed ? x.stride(0) : 0;
  m.row_stride = x.stride(timed ? 1 : 0);
  return m;
}

// Zoneout: a (T, B, F) indicator (training), a 0-d expectation (inference), or nothing (weight 0).
// row() gives the keep-old weights of one row at one step, always as a pointer: a per-thread buffer
// filled once with the constant (see fill_constant) stands in for the 0-d and absent cases, so the
// per-element loops carry no branches.
template <typename T>
struct Zoneout {
  StepMask<T> indicator;
  T constant = T(0);
  const T* filled = nullptr;
  const T* row(int64_t t, int64_t b) const { return indicator.present() ? indicator.row(t, 0, b) : filled; }
};

template <typename T>
Zoneout<T> zoneout_of(const optional<Tensor>& z) {
  Zoneout<T> out;
  if (!z.has_value() || !z->defined()) return out;
  if (z->dim() == 0) {
    out.constant = z->item<T>();
  } else {
    out.indicator = plain_mask<T>(z);
  }
  return out;
}

// A thread's copy of a Zoneout whose constant lives in `buffer` (n values).
template <typename T>
Zoneout<T> with_buffer(Zoneout<T> z, T* buffer, int64_t n) {
  std::fill(buffer, buffer + n, z.constant);
  z.filled = buffer;
  return z;
}

// ---------------------------------------------------------------------------------------------- threads
// While it lives, this thread computes with subnormal numbers flushed to zero (x86's FTZ and DAZ), then
// the thread's own mode comes back. Why: on x86 an operation on a subnormal (below 1.2e-38 in float32)
// costs about a hundred times an ordinary one, and gradients that fade over hundreds of steps get there --
// a GRU's backward over 200 steps with only the last output's gradient ran 20x slower than with every
// step's (measured here: 25 ms against 1.3). A flushed value differs from the reference's by less than
// 1.2e-38 (2.2e-308 in float64).
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15), DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushSubnormals() {}  // elsewhere the platform's own mode stands
#endif
};

// Run fn(rows_begin, rows_end, chunk) over a split of the batch into at most one chunk per thread.
template <typename F>
void for_each_batch_chunk(int64_t batch, F fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = batch * chunk / chunks, r1 = batch * (chunk + 1) / chunks;
      fn(r0, r1, chunk);
    }
  });
}

inline int64_t batch_chunks(int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
}

// Copy rows [r0, r1) of h (row stride ld) into dst (contiguous, width n), multiplied by a per-row mask.
template <typename T>
inline void masked_rows(const T* h, int64_t ld, int64_t r0, int64_t r1, int64_t n, const StepMask<T>& mask,
                        int64_t t, int64_t gate, T* dst) {
  for (int64_t b = r0; b < r1; ++b) {
    const T* src = h + b * ld;
    const T* m = mask.row(t, gate, b);
    T* out = dst + (b - r0) * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = src[j] * m[j];
  }
}

// ---------------------------------------------------------------------------------------------- layouts
// A per-step, per-gate tensor viewed as (B, T, G, U) with any strides (unit stride on U): input
// projections arrive either as (B, T, G·U) or gate-major (G, B, T, U), the latter when each gate saw its
// own input mask (one batched product per gate produced it).
template <typename T>
struct GateSeq {
  T* data;
  int64_t sb, st, sg;
  T* at(int64_t b, int64_t t, int64_t g) const { return data + b * sb + t * st + g * sg; }
};

template <typename T>
GateSeq<T> gate_seq(const Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2)};
}

// The recurrent kernel packed as P contiguous panels (P, K, N): whole (P = 1, N = G·U) when it is small,
// one panel per gate otherwise or when each gate has its own mask. A panel that fits in L2 is reused
// across the rows of a step instead of being streamed from memory once per row block.
//
// A bfloat16 recurrent kernel (only with float calls) means bfloat16 products: it is packed one matrix per
// gate (bf16.h) and `data` is null.
template <typename T>
struct Panels {
  const T* data;
  int64_t count, K, N;
  PackedBf16 packed;  // per gate, (K, U) each
  const T* panel(int64_t p) const { return data + p * K * N; }
  int64_t gates_per_panel() const { return packed.present() ? N / packed.N : 1; }
};

template <typename T>
Panels<T> panels_of(const Tensor& R, int64_t gates) {
  if (R.scalar_type() == at::kBFloat16) {
    TORCH_CHECK((std::is_same_v<T, float>), "droprnn: bfloat16 recurrent kernels are for float32 calls");
    return {nullptr, R.size(0), R.size(1), R.size(2), pack_gates_bf16(R, gates, false)};
  }
  return {R.data_ptr<T>(), R.size(0), R.size(1), R.size(2), PackedBf16{}};
}

// Z[:, p·N : (p+1)·N] = A_p @ R_p for panels [0, used), with A_p the rows [r0, r1) of h_prev masked by
// the panel's gate mask (a shared mask for all, or none). Per-gate masks need one panel per gate.
template <typename T>
void recurrent_product(const T* h_prev, int64_t ldh, int64_t r0, int64_t r1, const StepMask<T>& rec, int64_t t,
                       const Panels<T>& R, int64_t used, T* A, T* Z, int64_t ldz) {
  const int64_t n = r1 - r0, K = R.K, N = R.N;
  const T* base = h_prev - r0 * ldh;  // row b of h_prev is base + b * ldh
  if constexpr (std::is_same_v<T, float>) {
    if (R.packed.present()) {  // bfloat16 products, one per gate; h rounded once per distinct mask
      const int64_t gates = used * R.gates_per_panel(), U = R.packed.N;
      const bool per_gate = rec.present() && rec.gate_stride != 0;
      uint16_t* a16 = bf16_rows(n, R.packed.Kp);
      for (int64_t g = 0; g < gates; ++g) {
        if (g == 0 || per_gate) {
          if (rec.present()) masked_rows(base, ldh, r0, r1, K, rec, t, per_gate ? g : 0, A);
          round_rows(n, K, R.packed.Kp, rec.present() ? A : h_prev, rec.present() ? K : ldh, a16);
        }
        gemm_bf16_rounded(n, U, a16, R.packed, g, 0, Z + g * U, ldz, false);
      }
      return;
    }
  }
  if (!rec.present()) {
    for (int64_t p = 0; p < used; ++p) gemm(n, N, K, h_prev, ldh, R.panel(p), N, Z + p * N, ldz, false);
  } else if (rec.gate_stride == 0) {
    masked_rows(base, ldh, r0, r1, K, rec, t, 0, A);
    for (int64_t p = 0; p < used; ++p) gemm(n, N, K, A, K, R.panel(p), N, Z + p * N, ldz, false);
  } else {
    for (int64_t p = 0; p < used; ++p) {
      masked_rows(base, ldh, r0, r1, K, rec, t, p, A);
      gemm(n, N, K, A, K, R.panel(p), N, Z + p * N, ldz, false);
    }
  }
}

// out (n rows, ld ldo) [+]= sum_g (D_g @ WT_g) * m_g over gates [0, used): the gradient reaching the
// rows that were multiplied by W = WT^T after masking -- h_{t-1} through the recurrent kernel, or x_t
// through the input kernel. D (n, ldd) holds the gradients at the product's output, gate g in columns
// [g·U, (g+1)·U); WT is (G·U, width), so gate g's block is rows [g·U, (g+1)·U). Splitting the inner
// dimension by gate keeps each block small enough to stay in cache.
// With `packed` present (bfloat16 products) WT is not read: gate g's block is its matrix g.
template <typename T>
void product_grad(const T* D, int64_t ldd, int64_t r0, int64_t r1, int64_t t, int64_t used, int64_t U, const T* WT,
                  int64_t width, const StepMask<T>& mask, T* tmp, T* out, int64_t ldo, bool accumulate,
                  const PackedBf16& packed = PackedBf16{}) {
  const int64_t n = r1 - r0;
  auto product = [&](int64_t g, T* C, int64_t ldc, bool add) {
    if constexpr (std::is_same_v<T, float>) {
      if (packed.present()) return gemm_bf16(n, width, D + g * U, ldd, packed, g, 0, C, ldc, add);
    }
    gemm(n, width, U, D + g * U, ldd, WT + g * U * width, width, C, ldc, add);
  };
  if (!mask.present()) {
    for (int64_t g = 0; g < used; ++g) product(g, out, ldo, accumulate || g > 0);
    return;
  }
  const bool shared = mask.gate_stride == 0;
  for (int64_t g = 0; g < used; ++g) {
    product(g, tmp, width, shared && g > 0);
    if (shared && g + 1 < used) continue;
    const bool add = accumulate || (!shared && g > 0);
    for (int64_t b = r0; b < r1; ++b) {
      const T* m = mask.row(t, shared ? 0 : g, b);
      const T* tr = tmp + (b - r0) * width;
      T* o = out + (b - r0) * ldo;
      if (add) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) o[j] += tr[j] * m[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) o[j] = tr[j] * m[j];
      }
    }
  }
}

// dst (width, n) = n rows of src (ld apart, `width` values each) transposed; with `mask` present, each row
// first multiplied by its mask row (rows [r0, r0 + n) of gate g at step t).
template <typename T>
void transpose_rows(const T* src, int64_t ld, int64_t n, int64_t width, T* dst, const StepMask<T>& mask = StepMask<T>{},
                    int64_t t = 0, int64_t g = 0, int64_t r0 = 0) {
  for (int64_t r = 0; r < n; ++r) {
    const T* row = src + r * ld;
    T* col = dst + r;
    if (mask.present()) {
      const T* m = mask.row(t, g, r0 + r);
      for (int64_t i = 0; i < width; ++i) col[i * n] = row[i] * m[i];
    } else {
      for (int64_t i = 0; i < width; ++i) col[i * n] = row[i];
    }
  }
}

// Per-gate masks that are the same at every step, transposed once per call for the rows [r0, r1) of one
// chunk of the batch: (G, F, n). A step's weight gradient then masks its one transposed block with a
// vectorised multiply per gate instead of making a strided, masked copy per gate (profiling LSTM training at
// (32, 100, 64, 128) with per-gate masks, weight_grad's own share of the samples fell from 4.4% to 3.0%).
// Empty for other masks.
template <typename T>
struct MaskColumns {
  std::vector<T> data;
  int64_t F = 0, n = 0;
  bool present() const { return !data.empty(); }
  const T* gate(int64_t g) const { return data.data() + g * F * n; }
};

template <typename T>
MaskColumns<T> mask_columns(const StepMask<T>& mask, int64_t gates, int64_t r0, int64_t r1, int64_t F) {
  MaskColumns<T> c;
  if (!mask.present() || mask.gate_stride == 0 || mask.step_stride != 0 || r1 <= r0) return c;
  c.F = F;
  c.n = r1 - r0;
  c.data.resize(static_cast<size_t>(gates * F * c.n));
  for (int64_t g = 0; g < gates; ++g)
    transpose_rows(mask.row(0, g, r0), mask.row_stride, c.n, F, c.data.data() + g * F * c.n);
  return c;
}

// W (width, ld ldw) += sum_g (S * m_g)^T @ D_g over gates [0, used): a weight gradient accumulated one
// step at a time, for the rows [r0, r1) of S (ld lds) -- h_{t-1} for the recurrent kernel, x_t for the
// input kernel -- with the masks applied in cache instead of in a masked copy of the whole sequence.
// ST is scratch for one transposed block (width, n), for two with `columns` (the masks transposed,
// mask_columns, where they serve).
template <typename T>
void weight_grad(const T* S, int64_t lds, int64_t r0, int64_t r1, int64_t width, const StepMask<T>& mask, int64_t t,
                 const T* D, int64_t ldd, int64_t used, int64_t U, T* W, int64_t ldw, T* ST,
                 const MaskColumns<T>& columns = MaskColumns<T>{}) {
  const int64_t n = r1 - r0;
  const bool per_gate = mask.present() && mask.gate_stride != 0;
  if (per_gate && columns.present()) {
    transpose_rows(S, lds, n, width, ST);
    T* masked = ST + width * n;
    for (int64_t g = 0; g < used; ++g) {
      const T* m = columns.gate(g);
#pragma omp simd
      for (int64_t k = 0; k < width * n; ++k) masked[k] = ST[k] * m[k];
      gemm(width, U, n, masked, n, D + g * U, ldd, W + g * U, ldw, true);
    }
    return;
  }
  for (int64_t g = 0; g < (per_gate ? used : 1); ++g) {
    transpose_rows(S, lds, n, width, ST, mask, t, g, r0);
    const int64_t cols = per_gate ? U : used * U;
    gemm(width, cols, n, ST, n, D + g * U, ldd, W + g * U, ldw, true);
  }
}

// What a backward computes besides the recurrence itself: gradients of the input rows (x), of the input
// kernel and bias (accumulated per chunk of the batch), and of the recurrent kernel.
template <typename T>
struct InputSide {
  const T* x = nullptr;       // (B, T, D)
  const T* KT = nullptr;      // (G·U, D): the input kernel transposed
  StepMask<T> mask;           // input masks: (m, B, D) or (T, 1, B, D)
  int64_t features = 0;
  T* dx = nullptr;            // (B, T, D), or null when not wanted
  bool want_kernel = false, want_bias = false;
};

// The input side of one backward step: dK += (x_t * m_g)^T Dz_g, db += sum of Dz rows, and
// dx_t = sum_g (Dz_g @ K_g^T) * m_g, each only when wanted. Dz holds the step's gradients at the
// projections (n rows, ld ldd, `gates` blocks of U).
// `columns`: the input masks transposed for these rows (mask_columns), where they serve.
template <typename T>
void accumulate_input_side(const InputSide<T>& in, const T* Dz, int64_t ldd, int64_t gates, int64_t U, int64_t r0,
                           int64_t r1, int64_t t, int64_t steps, T* tmp, T* ST, T* dK_acc, T* db_acc,
                           const MaskColumns<T>& columns = MaskColumns<T>{}) {
  const int64_t D = in.features, width = gates * U;
  const T* x_t = in.x + (r0 * steps + t) * D;
  if (in.want_kernel)
    weight_grad(x_t, steps * D, r0, r1, D, in.mask, t, Dz, ldd, gates, U, dK_acc, width, ST, columns);
  if (in.want_bias) {
    for (int64_t b = r0; b < r1; ++b) {
      const T* d = Dz + (b - r0) * ldd;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) db_acc[j] += d[j];
    }
  }
  if (in.dx != nullptr)
    product_grad(Dz, ldd, r0, r1, t, gates, U, in.KT, D, in.mask, tmp, in.dx + (r0 * steps + t) * D, steps * D, false);
}

// Where a backward keeps every step's gate gradients for the large products after its loop: dz (B, T, ld) in
// the call's type, or in bfloat16 when those products run in bfloat16 (rounded here, while the rows are in
// cache: a separate pass over a large dz took as long as one of the products). Nothing to keep when dz is
// undefined (the weight gradients are then accumulated in the loop).
template <typename T>
struct StepGrads {
  T* same = nullptr;
  uint16_t* low = nullptr;  // bfloat16 bits
  int64_t ld = 0, steps = 0;

  bool present() const { return same != nullptr || low != nullptr; }

  // Rows [r0, r1) of one step's block src (n rows, leading dimension lds, `width` values each) into columns
  // [col, col + width) of dz at step t.
  void keep(int64_t col, const T* src, int64_t lds, int64_t width, int64_t r0, int64_t r1, int64_t t) const {
    for (int64_t b = r0; b < r1; ++b) {
      const T* row = src + (b - r0) * lds;
      const int64_t at = (b * steps + t) * ld + col;
      if (same != nullptr) {
        std::copy(row, row + width, same + at);
      } else if (low != nullptr) {
        uint16_t* out = low + at;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) out[j] = bf16_bits(static_cast<float>(row[j]));
      }
    }
  }
};

template <typename T>
StepGrads<T> step_grads(const Tensor& dz) {
  StepGrads<T> kept;
  if (!dz.defined()) return kept;
  kept.ld = dz.size(2);
  kept.steps = dz.size(1);
  if (dz.scalar_type() == at::kBFloat16) {
    TORCH_CHECK((std::is_same_v<T, float>), "droprnn: bfloat16 gate gradients are for float32 calls");
    kept.low = reinterpret_cast<uint16_t*>(dz.data_ptr<at::BFloat16>());
  } else {
    kept.same = dz.data_ptr<T>();
  }
  return kept;
}

// The dz a backward hands back when it defers the weight gradients: bfloat16 with bfloat16 products (a
// bfloat16 recurrent kernel), else the call's type.
inline Tensor deferred_grads(bool wanted, int64_t B, int64_t T, int64_t width, const Tensor& x, const Tensor& R) {
  if (!wanted) return Tensor();
  const bool low = R.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kFloat;
  return pooled_empty({B, T, width}, x.options().dtype(low ? at::kBFloat16 : x.scalar_type()));
}

// Sum the per-chunk accumulators -- each chunk holds the outputs' gradients back to back, acc_size in
// all -- into those outputs (undefined ones take no space).
template <typename T>
void reduce_chunks(const T* acc, int64_t chunks, int64_t acc_size, std::initializer_list<Tensor*> outputs) {
  int64_t offset = 0;
  for (Tensor* out : outputs) {
    if (!out->defined()) continue;
    const int64_t n = out->numel();
    T* dst = out->data_ptr<T>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T sum = T(0);
        for (int64_t c = 0; c < chunks; ++c) sum += acc[c * acc_size + offset + i];
        dst[i] = sum;
      }
    });
    offset += n;
  }
}

}  // namespace droprnn
