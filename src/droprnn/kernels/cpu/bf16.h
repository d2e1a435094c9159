// bfloat16 products for the fused recurrences: operands rounded to bfloat16, float32 accumulation, float32
// results -- through PyTorch's brgemm micro-kernel (oneDNN) where it runs them (AMX: on a Xeon, 6-8x the
// float32 brgemm at the per-step shapes, measured), else through droprnn's own AVX512-BF16 micro-kernel
// (bf16_dot.h; an AMD EPYC, Zen 4/5). Everything else of a recurrence stays float32: states, gates, masks,
// the carried gradients.
//
// The right-hand matrix of a product is packed once per call, in blocks of 64 columns, in the layout of the
// engine that runs it (oneDNN's, or pairs of rows for vdpbf16ps); the left-hand rows (h, or a step's
// gradients) are rounded into a per-thread buffer before each product.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bf16_dot.h"

namespace droprnn {

constexpr int64_t kBf16Block = 64;  // columns per packed block (oneDNN's packing takes 16, 32, 48 or 64)

// What runs the bfloat16 products on this CPU: PyTorch's brgemm (could_pack: AMX), droprnn's AVX512-BF16
// micro-kernel, or nothing (decided once per process).
enum class Bf16Engine { kNone, kBrgemm, kDot };
Bf16Engine bf16_engine();
std::string bf16_engine_name();  // "brgemm", "avx512_bf16" or "none" (no products available)

// Whether this CPU runs bfloat16 products (an engine, and one small product through it checked against
// float32; decided once per process).
bool bf16_products_available();

// `count` matrices (K, N) rounded to bfloat16 and packed: each as ceil(N / 64) blocks of (Kp, 64), Kp = K
// rounded up to even (VNNI pairs rows), the padding zero.
struct PackedBf16 {
  at::Tensor storage;
  const at::BFloat16* data = nullptr;
  int64_t count = 0, K = 0, Kp = 0, N = 0, blocks = 0;
  bool pairs = false;  // packed in pairs of rows for bf16_dot.h (else in oneDNN's layout, for brgemm)

  bool present() const { return data != nullptr; }
  const at::BFloat16* matrix(int64_t i) const { return data + i * blocks * Kp * kBf16Block; }
};

// mats: (count, K, N) of any floating dtype and strides.
PackedBf16 pack_bf16(const at::Tensor& mats);

// The recurrent kernel (H, G·U) -- or its G-panel (G, H, U) / one-panel (1, H, G·U) forms -- packed one
// matrix per gate, (H, U) each, or transposed, (U, H) each (for the backward's gradient through it).
PackedBf16 pack_gates_bf16(const at::Tensor& R, int64_t gates, bool transpose);

// Round-to-nearest-even, NaN kept NaN; written on the bits so the loop vectorises.
inline uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// A per-thread buffer of bfloat16 rows for the left-hand side of a product; grows, never shrinks, so the
// time loops allocate only on their first steps.
inline uint16_t* bf16_rows(int64_t rows, int64_t ld) {
  thread_local std::vector<uint16_t> buffer;
  const size_t need = static_cast<size_t>(std::max<int64_t>(rows * ld, 1));
  if (buffer.size() < need) buffer.resize(need);
  return buffer.data();
}

// dst (M, Kp) = bfloat16(A (M, K), row stride lda), the padding column (Kp > K) zero.
inline void round_rows(int64_t M, int64_t K, int64_t Kp, const float* A, int64_t lda, uint16_t* dst) {
  for (int64_t i = 0; i < M; ++i) {
    const float* a = A + i * lda;
    uint16_t* d = dst + i * Kp;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) d[k] = bf16_bits(a[k]);
    for (int64_t k = K; k < Kp; ++k) d[k] = 0;
  }
}

// C (M, N) [+]= A16 (M, Kp, already rounded) @ matrix `which` of B, columns [col0, col0 + N) of it; col0 a
// multiple of 64. `stream`: see dot_bf16_block (droprnn's own engine only).
inline void gemm_bf16_rounded(int64_t M, int64_t N, const uint16_t* A16, const PackedBf16& B, int64_t which,
                              int64_t col0, float* C, int64_t ldc, bool accumulate, bool stream = false) {
  if (M == 0 || N == 0) return;  // oneDNN's brgemm throws std::bad_alloc for M == 0
  const at::BFloat16* a = reinterpret_cast<const at::BFloat16*>(A16);
  const at::BFloat16* base = B.matrix(which);
  for (int64_t j = 0; j < N; j += kBf16Block) {
    const int64_t width = std::min(kBf16Block, N - j);
    const at::BFloat16* block = base + ((col0 + j) / kBf16Block) * B.Kp * kBf16Block;
    if (B.pairs) {
      dot_bf16_block(M, B.Kp, A16, reinterpret_cast<const uint16_t*>(block), C + j, ldc, width, accumulate, stream);
    } else {
      at::native::cpublas::brgemm(M, width, B.Kp, B.Kp, kBf16Block, ldc, accumulate, a, block, C + j, true);
    }
  }
}

// C (M, N) [+]= bfloat16(A (M, K)) @ matrix `which` of B (columns [col0, col0 + N)).
inline void gemm_bf16(int64_t M, int64_t N, const float* A, int64_t lda, const PackedBf16& B, int64_t which,
                      int64_t col0, float* C, int64_t ldc, bool accumulate, bool stream = false) {
  uint16_t* a16 = bf16_rows(M, B.Kp);
  round_rows(M, B.K, B.Kp, A, lda, a16);
  gemm_bf16_rounded(M, N, a16, B, which, col0, C, ldc, accumulate, stream);
}

// The hardware context brgemm keeps per thread (AMX tile configuration): released where a thread's
// bfloat16 products end.
inline void bf16_release(const PackedBf16& B) {
  if (B.present() && !B.pairs) at::native::cpublas::brgemm_release(true);
}

}  // namespace droprnn
