// float32 products of the input projections through the same brgemm micro-kernel as the recurrent products
// (common.h's gemm). Whether they beat torch.mm depends on the machine: on an AMD EPYC (Zen 4) MKL's sgemm
// ran these shapes at ~120 GFLOP/s on 2 threads and brgemm faster; on a Xeon MKL was the faster. So
// kernels/cpu/machine.py measures both once and kernels/fused.py calls the winner.
#include "checks.h"
#include "common.h"

namespace droprnn {

namespace {
// A matrix read or written row by row: unit stride along a row, rows that do not overlap.
void check_rows(const char* fn, const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, fn, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, fn, ": ", name, " must have shape ",
              shape_text({rows, cols}), ", got ", shape_text(t.sizes()));
  TORCH_CHECK((cols <= 1 || t.stride(1) == 1) && (rows <= 1 || t.stride(0) >= cols), fn, ": ", name,
              " must have a unit stride along its rows and rows that do not overlap, got strides ",
              shape_text(t.strides()));
}
}  // namespace

// out (M, N) = a (M, K) @ b (K, N), float32. Each thread takes a band of a's rows and walks b block by block
// (gemm's blocking), so a block of b stays in L2 while the band's rows pass over it.
void float_mm(const Tensor& a, const Tensor& b, Tensor& out) {
  const char* fn = "droprnn float_mm";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, fn, ": a and b must be matrices, got shapes ", shape_text(a.sizes()),
              " and ", shape_text(b.sizes()));
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  check_rows(fn, a, "a", M, K);
  check_rows(fn, b, "b", K, N);
  check_rows(fn, out, "out", M, N);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const float* A = a.const_data_ptr<float>();
  const float* Bp = b.const_data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = out.stride(0);
  for_each_batch_chunk(M, [&](int64_t r0, int64_t r1, int64_t) {
    gemm(r1 - r0, N, K, A + r0 * lda, lda, Bp, ldb, C + r0 * ldc, ldc, false);
  });
}

}  // namespace droprnn
