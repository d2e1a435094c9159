// bfloat16 products on AVX512-BF16 (vdpbf16ps), for CPUs where PyTorch's brgemm runs none: it runs
// bfloat16 on AMX only, so an AMD EPYC (Zen 4/5) would otherwise compute a bfloat16 call in float32.
// The right-hand matrix comes packed as bf16.h packs it, blocks of 64 columns, each in pairs of rows
// (VNNI: element (k, n) of a block at ((k / 2) * 64 + n) * 2 + k % 2), so one 32-bit lane holds a column's
// two consecutive rows and one instruction adds both of their products to a float32 accumulator. Each
// product of two bfloat16 values is exact in float32; only the accumulation rounds, as in float32.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define DROPRNN_HAS_AVX512_BF16 1
#else
#define DROPRNN_HAS_AVX512_BF16 0
#endif

namespace droprnn {

#if DROPRNN_HAS_AVX512_BF16
namespace dot_detail {

constexpr int kLanes = 16;   // float32 columns per register
constexpr int kVectors = 4;  // registers per row: the 64 columns of a packed block

inline __mmask16 columns_mask(int64_t width, int v) {
  const int64_t n = width - v * kLanes;
  return n >= kLanes ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// C rows [0, R) x columns [0, width) of one block [+]= A16 rows (pairs of bfloat16, row stride lda) @ block.
template <int R>
inline void tile(int64_t pairs, const uint16_t* A, int64_t lda, const uint16_t* block, float* C, int64_t ldc,
                 int64_t width, bool accumulate) {
  __m512 acc[R][kVectors];
  __mmask16 masks[kVectors];
  for (int v = 0; v < kVectors; ++v) masks[v] = columns_mask(width, v);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(masks[v], C + r * ldc + v * kLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* row = block + p * (kVectors * kLanes * 2);
    __m512i b[kVectors];
    for (int v = 0; v < kVectors; ++v) b[v] = _mm512_loadu_si512(row + v * kLanes * 2);
    for (int r = 0; r < R; ++r) {
      int32_t two;
      std::memcpy(&two, A + r * lda + 2 * p, sizeof(two));
      const __m512i a = _mm512_set1_epi32(two);
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) _mm512_mask_storeu_ps(C + r * ldc + v * kLanes, masks[v], acc[r][v]);
  }
}

}  // namespace dot_detail

// C (M, width) [+]= A16 (M, Kp: rows rounded to bfloat16, Kp even, row stride Kp) @ one packed block
// (Kp, 64) of which the first `width` columns are wanted.
inline void dot_bf16_block(int64_t M, int64_t Kp, const uint16_t* A16, const uint16_t* block, float* C,
                           int64_t ldc, int64_t width, bool accumulate) {
  constexpr int kRows = 6;  // 6 x 4 accumulators + 4 right-hand registers + 1 broadcast: 29 of 32 registers
  const int64_t pairs = Kp / 2;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    dot_detail::tile<kRows>(pairs, A16 + i * Kp, Kp, block, C + i * ldc, ldc, width, accumulate);
  }
  const uint16_t* a = A16 + i * Kp;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: dot_detail::tile<5>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 4: dot_detail::tile<4>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 3: dot_detail::tile<3>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 2: dot_detail::tile<2>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 1: dot_detail::tile<1>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    default: break;
  }
}
#else
inline void dot_bf16_block(int64_t, int64_t, const uint16_t*, const uint16_t*, float*, int64_t, int64_t, bool) {}
#endif

}  // namespace droprnn
