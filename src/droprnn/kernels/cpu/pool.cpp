// A cache of large CPU blocks, reused across calls, for the fused kernels' sequence-sized tensors.
//
// Why: a training step allocates the same sequence-sized tensors every time (projections, gates, states,
// gradients). glibc serves blocks this large with mmap and unmaps them when freed, so every step pays the
// kernel's first-touch page faults again -- measured here, about 10 ms per 50 MiB, a tenth of the step at
// (128, 50, 256, 512). A freed block is kept instead and handed to the next request of (about) its size,
// the way PyTorch's CUDA caching allocator works. The blocks held but unused are capped
// (DROPRNN_CPU_CACHE_MB, default 1024; 0 turns the cache off) and released by empty_cache().
#include <ATen/Context.h>

#include <cstdlib>
#include <limits>
#include <list>
#include <mutex>
#include <utility>

#include "common.h"

namespace droprnn {
namespace {

constexpr size_t kSmallest = size_t(1) << 20;  // smaller requests go to the ordinary allocator
constexpr size_t kPage = size_t(1) << 12;

struct Pool {
  std::mutex lock;
  std::list<std::pair<size_t, void*>> free;  // most recently freed first
  size_t cached = 0, limit;

  Pool() {
    const char* mb = std::getenv("DROPRNN_CPU_CACHE_MB");
    limit = (mb != nullptr ? static_cast<size_t>(std::strtoull(mb, nullptr, 10)) : size_t(1024)) << 20;
  }

  // A block of at least `bytes`; reuses a cached one wasting at most a quarter of it.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> guard(lock);
      for (auto it = free.begin(); it != free.end(); ++it) {
        if (it->first >= bytes && it->first - bytes <= it->first / 4) {
          void* block = it->second;
          cached -= it->first;
          free.erase(it);
          return block;
        }
      }
    }
    void* block = std::aligned_alloc(64, bytes);
    TORCH_CHECK(block != nullptr, "droprnn: out of memory allocating ", bytes, " bytes");
    return block;
  }

  void give_back(void* block, size_t bytes) {
    std::list<std::pair<size_t, void*>> evicted;
    {
      std::lock_guard<std::mutex> guard(lock);
      free.emplace_front(bytes, block);
      cached += bytes;
      while (cached > limit && !free.empty()) {  // the least recently freed go first
        cached -= free.back().first;
        evicted.splice(evicted.end(), free, std::prev(free.end()));
      }
    }
    for (auto& [size, b] : evicted) std::free(b);
  }

  int64_t release() {
    std::list<std::pair<size_t, void*>> evicted;
    size_t bytes;
    {
      std::lock_guard<std::mutex> guard(lock);
      evicted.swap(free);
      bytes = cached;
      cached = 0;
    }
    for (auto& [size, b] : evicted) std::free(b);
    return static_cast<int64_t>(bytes);
  }
};

// Never destroyed: tensors from the pool may be freed during interpreter shutdown, after static destructors.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

}  // namespace

Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kSmallest || pool().limit == 0 || options.device().type() != at::kCPU) return at::empty(sizes, options);
  const size_t rounded = (bytes + kPage - 1) / kPage * kPage;
  void* block = pool().take(rounded);
  Tensor out = at::from_blob(block, sizes, [rounded](void* p) { pool().give_back(p, rounded); }, options);
  // Honour torch.utils.deterministic.fill_uninitialized_memory as at::empty does (NaN for floats): the
  // tests rely on it to catch an element a kernel forgot to write.
  auto& context = at::globalContext();
  if (at::isFloatingType(out.scalar_type()) && context.deterministicAlgorithms() &&
      context.deterministicFillUninitializedMemory()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

Tensor pooled_empty_op(at::IntArrayRef sizes, at::ScalarType dtype) {
  // From Python: sizes must be non-negative and their product representable, before anything is allocated.
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "droprnn empty: sizes must be non-negative, got ", sizes);
    TORCH_CHECK(!__builtin_mul_overflow(numel, s, &numel), "droprnn empty: too many elements in ", sizes);
  }
  TORCH_CHECK(at::isFloatingType(dtype), "droprnn empty: a floating dtype is expected, got ", dtype);
  return pooled_empty(sizes, at::TensorOptions().dtype(dtype));
}

int64_t empty_cache() { return pool().release(); }

int64_t cached_bytes() {
  std::lock_guard<std::mutex> guard(pool().lock);
  return static_cast<int64_t>(pool().cached);
}

}  // namespace droprnn
