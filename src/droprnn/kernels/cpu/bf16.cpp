// Packing for the bfloat16 products (bf16.h), the check that this CPU runs them, and the large product
// before a time loop (the input projections of every step) in the same arithmetic.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>

#include "bf16.h"
#include "checks.h"

namespace droprnn {

template <typename S>
static void round_row(const S* in, int64_t stride, int64_t n0, int64_t n1, uint16_t* row) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t n = n0; n < n1; ++n) row[n] = bf16_bits(static_cast<float>(in[n]));
  } else {
    for (int64_t n = n0; n < n1; ++n) row[n] = bf16_bits(static_cast<float>(in[n * stride]));
  }
}

// padded (count, Kp, Np) bfloat16 = mats (count, K, N) rounded, zeros beyond K and N. In square tiles, so a
// transposed source (a torch-layout weight seen as (in, out)) is read as fast as a row-major one.
static void round_padded(const at::Tensor& mats, at::Tensor& padded) {
  const int64_t count = mats.size(0), K = mats.size(1), N = mats.size(2);
  const int64_t Kp = padded.size(1), Np = padded.size(2);
  constexpr int64_t kTile = 32;
  const int64_t k_tiles = (Kp + kTile - 1) / kTile, n_tiles = (Np + kTile - 1) / kTile;
  uint16_t* dst = reinterpret_cast<uint16_t*>(padded.data_ptr<at::BFloat16>());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, mats.scalar_type(), "droprnn_pack_bf16", [&] {
    const scalar_t* src = mats.const_data_ptr<scalar_t>();
    const int64_t sm = mats.stride(0), sk = mats.stride(1), sn = mats.stride(2);
    auto rounded = [&](int64_t m, int64_t k, int64_t n0, int64_t n1, uint16_t* row) {
      round_row(src + m * sm + k * sk, sn, n0, n1, row);
    };
    if (sn == 1) {  // rows are contiguous: row by row
      at::parallel_for(0, count * Kp, 8, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t m = i / Kp, k = i % Kp;
          uint16_t* row = dst + i * Np;
          if (k < K) rounded(m, k, 0, N, row);
          std::fill(row + (k < K ? N : 0), row + Np, uint16_t(0));
        }
      });
      return;
    }
    at::parallel_for(0, count * k_tiles * n_tiles, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i / (k_tiles * n_tiles), k0 = (i / n_tiles) % k_tiles * kTile, n0 = i % n_tiles * kTile;
        const int64_t n1 = std::min(n0 + kTile, Np), n_in = std::min(n1, N);
        for (int64_t k = k0; k < std::min(k0 + kTile, Kp); ++k) {
          uint16_t* row = dst + (m * Kp + k) * Np;
          if (k < K) rounded(m, k, n0, std::max(n0, n_in), row);
          std::fill(row + (k < K ? std::max(n0, n_in) : n0), row + n1, uint16_t(0));
        }
      }
    });
  });
}

PackedBf16 pack_bf16(const at::Tensor& mats) {
  TORCH_CHECK(mats.dim() == 3, "droprnn pack_bf16: (count, K, N) matrices expected, got ", shape_text(mats.sizes()));
  PackedBf16 p;
  p.count = mats.size(0);
  p.K = mats.size(1);
  p.N = mats.size(2);
  p.Kp = p.K + (p.K % 2);
  p.blocks = (p.N + kBf16Block - 1) / kBf16Block;
  // Rounded and zero-padded to whole blocks first (Kp, blocks · 64) per matrix, then packed block by block.
  at::Tensor padded = at::empty({p.count, p.Kp, p.blocks * kBf16Block}, mats.options().dtype(at::kBFloat16));
  round_padded(mats, padded);
  p.storage = at::empty({std::max<int64_t>(p.count * p.blocks * p.Kp * kBf16Block, 1)}, padded.options());
  const auto* src = padded.const_data_ptr<at::BFloat16>();
  auto* dst = p.storage.data_ptr<at::BFloat16>();
  const int64_t ld = p.blocks * kBf16Block;
  p.pairs = bf16_engine() == Bf16Engine::kDot;
  at::parallel_for(0, p.count * p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / p.blocks, b = i % p.blocks;
      const at::BFloat16* from = src + m * p.Kp * ld + b * kBf16Block;
      at::BFloat16* to = dst + i * p.Kp * kBf16Block;
      if (!p.pairs) {
        at::native::cpublas::pack(p.Kp, kBf16Block, ld, kBf16Block, at::kBFloat16, at::kBFloat16, from, to);
        continue;
      }
      for (int64_t k = 0; k < p.Kp; ++k) {  // element (k, n) at ((k / 2) * 64 + n) * 2 + k % 2
        for (int64_t n = 0; n < kBf16Block; ++n) to[((k / 2) * kBf16Block + n) * 2 + k % 2] = from[k * ld + n];
      }
    }
  });
  p.data = dst;
  return p;
}

PackedBf16 pack_gates_bf16(const at::Tensor& R, int64_t gates, bool transpose) {
  // (H, G·U), (1, H, G·U) or (G, H, U) -> (G, H, U)
  at::Tensor per_gate;
  if (R.dim() == 2 || R.size(0) == 1) {
    const at::Tensor whole = R.dim() == 2 ? R : R.select(0, 0);
    per_gate = whole.view({whole.size(0), gates, whole.size(1) / gates}).permute({1, 0, 2});
  } else {
    per_gate = R;
  }
  return pack_bf16(transpose ? per_gate.transpose(1, 2) : per_gate);
}

Bf16Engine bf16_engine() {
  static const Bf16Engine engine = [] {
    // $DROPRNN_BF16_ENGINE picks one the CPU runs (so a CPU with AMX tests the AVX512-BF16 kernel too):
    // "brgemm", "avx512_bf16" or "none"; unset or anything else, the fastest.
    const char* asked = std::getenv("DROPRNN_BF16_ENGINE");
    const std::string wanted = asked == nullptr ? "" : asked;
    const bool brgemm = at::native::cpublas::could_pack(at::kBFloat16);
    bool dot = false;
#if DROPRNN_HAS_AVX512_BF16
    dot = __builtin_cpu_supports("avx512bf16");
#endif
    if (wanted == "none") return Bf16Engine::kNone;
    if (wanted == "avx512_bf16") return dot ? Bf16Engine::kDot : Bf16Engine::kNone;
    if (wanted == "brgemm") return brgemm ? Bf16Engine::kBrgemm : Bf16Engine::kNone;
    return brgemm ? Bf16Engine::kBrgemm : dot ? Bf16Engine::kDot : Bf16Engine::kNone;
  }();
  return engine;
}

std::string bf16_engine_name() {
  if (!bf16_products_available()) return "none";
  return bf16_engine() == Bf16Engine::kBrgemm ? "brgemm" : "avx512_bf16";
}

bool bf16_products_available() {
  static const bool available = [] {
    try {
      if (bf16_engine() == Bf16Engine::kNone) return false;
      // One product of a size the kernels use, against float32 on the same rounded values.
      const at::Tensor a = at::randn({5, 6}).to(at::kBFloat16).to(at::kFloat);
      const at::Tensor b = at::randn({1, 6, 70}).to(at::kBFloat16).to(at::kFloat);
      const PackedBf16 packed = pack_bf16(b);
      at::Tensor c = at::zeros({5, 70});
      gemm_bf16(5, 70, a.const_data_ptr<float>(), 6, packed, 0, 0, c.data_ptr<float>(), 70, false);
      bf16_release(packed);
      // The reference by hand: an ATen product here would run under the caller's autocast, if any.
      const float *pa = a.const_data_ptr<float>(), *pb = b.const_data_ptr<float>(), *pc = c.const_data_ptr<float>();
      for (int64_t i = 0; i < 5; ++i) {
        for (int64_t j = 0; j < 70; ++j) {
          double want = 0;
          for (int64_t k = 0; k < 6; ++k) want += double(pa[i * 6 + k]) * double(pb[k * 70 + j]);
          if (std::abs(want - pc[i * 70 + j]) > 1e-5 * (1 + std::abs(want))) return false;
        }
      }
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

// out (M, N) = bfloat16(a (M, K)) @ bfloat16(b (K, N)), float32 accumulation and result: the input
// projections of a bfloat16 call, in the arithmetic of its recurrent products. a and b of any floating
// dtype and strides; out float32 with a unit stride on its last axis.
void bf16_mm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const char* fn = "droprnn bf16_mm";
  TORCH_CHECK(bf16_products_available(), fn, ": this CPU has no bfloat16 products (oneDNN's brgemm)");
  check_dim(fn, a, "a", 2);
  check_dim(fn, b, "b", 2);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K, fn, ": b must have ", K, " rows (a's columns), got shape ", shape_text(b.sizes()));
  for (const at::Tensor* t : {&a, &b}) {
    TORCH_CHECK(t->device().is_cpu() && at::isFloatingType(t->scalar_type()), fn,
                ": a and b must be floating CPU tensors, got ", t->scalar_type(), " on ", t->device());
  }
  const CallDims d{fn, M, 0, 1, N, 0, K, at::kFloat};
  check_tensor(d, out, "out", {M, N}, Layout::kRows);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const PackedBf16 packed = pack_bf16(b.unsqueeze(0));
  const at::Tensor rows = a.to(at::kFloat).contiguous();  // the rounding below reads float rows
  const float* A = rows.const_data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t ldc = out.stride(0);
  constexpr int64_t kRows = 64;  // a tile of rows: its rounded copy stays in L1/L2 while every block passes
  // The results go past the caches (non-temporal stores where the dot engine can): writing a large result
  // through them costs a read of each line first, and the recurrence reads its rows only later. Measured on
  // an AMD EPYC (Zen 4): bfloat16 LSTM inference 4-18% faster at every benchmark shape, batch 1 included.
  at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * kRows, n = std::min(kRows, M - r0);
      gemm_bf16(n, N, A + r0 * K, K, packed, 0, 0, C + r0 * ldc, ldc, false, /*stream=*/true);
    }
    dot_stream_fence();
    bf16_release(packed);
  });
}

}  // namespace droprnn
