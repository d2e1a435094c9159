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
// Stream: C is written with non-temporal stores, past the caches (whole 64-column blocks, 64-byte aligned
// rows, no accumulation: the caller checks).
template <int R, bool Stream>
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
    for (int v = 0; v < kVectors; ++v) {
      if constexpr (Stream) {
        _mm512_stream_ps(C + r * ldc + v * kLanes, acc[r][v]);
      } else {
        _mm512_mask_storeu_ps(C + r * ldc + v * kLanes, masks[v], acc[r][v]);
      }
    }
  }
}

template <bool Stream>
inline void block_rows(int64_t M, int64_t Kp, const uint16_t* A16, const uint16_t* block, float* C, int64_t ldc,
                       int64_t width, bool accumulate) {
  constexpr int kRows = 6;  // 6 x 4 accumulators + 4 right-hand registers + 1 broadcast: 29 of 32 registers
  const int64_t pairs = Kp / 2;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    tile<kRows, Stream>(pairs, A16 + i * Kp, Kp, block, C + i * ldc, ldc, width, accumulate);
  }
  const uint16_t* a = A16 + i * Kp;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, Stream>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 4: tile<4, Stream>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 3: tile<3, Stream>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 2: tile<2, Stream>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    case 1: tile<1, Stream>(pairs, a, Kp, block, c, ldc, width, accumulate); break;
    default: break;
  }
}

}  // namespace dot_detail

// C (M, width) [+]= A16 (M, Kp: rows rounded to bfloat16, Kp even, row stride Kp) @ one packed block
// (Kp, 64) of which the first `width` columns are wanted. `stream`: for results too large to stay in cache,
// C is written past the caches where that is safe (a whole 64-byte aligned block, not accumulated); the
// caller then calls dot_stream_fence() before another thread reads it.
inline void dot_bf16_block(int64_t M, int64_t Kp, const uint16_t* A16, const uint16_t* block, float* C,
                           int64_t ldc, int64_t width, bool accumulate, bool stream = false) {
  const bool aligned = reinterpret_cast<uintptr_t>(C) % 64 == 0 && (M == 1 || ldc % dot_detail::kLanes == 0);
  if (stream && !accumulate && aligned && width == dot_detail::kVectors * dot_detail::kLanes) {
    dot_detail::block_rows<true>(M, Kp, A16, block, C, ldc, width, accumulate);
  } else {
    dot_detail::block_rows<false>(M, Kp, A16, block, C, ldc, width, accumulate);
  }
}

// Orders this thread's streamed stores before what follows (another thread reading the results).
inline void dot_stream_fence() { _mm_sfence(); }
#else
inline void dot_bf16_block(int64_t, int64_t, const uint16_t*, const uint16_t*, float*, int64_t, int64_t, bool,
                           bool = false) {}
inline void dot_stream_fence() {}
#endif

}  // namespace droprnn
