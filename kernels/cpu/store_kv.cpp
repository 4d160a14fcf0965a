// The paged K/V store for the CPU decode step: token i's K and V rows go to cache slot slot_mapping[i] (slot s is
// row s % page of block s / page); a negative slot (a padding token) writes nothing. An op of its own, with the
// caches declared mutated, so that torch.compile writes them in place: traced as index_copy_ on views of the
// caches, inductor copied each layer's whole cache back every step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace {

void store_rows(const at::Tensor& x, const at::Tensor& cache, const int64_t* slots, int64_t n) {
  const int64_t heads = cache.size(2), d = cache.size(3), item = cache.element_size();
  const int64_t page = cache.size(1);
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t s0 = x.stride(0) * item, s1 = x.stride(1) * item, s2 = x.stride(2) * item;
  const int64_t row = cache.stride(1) * item, block = cache.stride(0) * item;
  const bool contiguous_rows = x.stride(2) == 1 && x.stride(1) == d;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      char* out = dst + (slots[t] / page) * block + (slots[t] % page) * row;
      const char* in = src + t * s0;
      if (contiguous_rows) {
        std::memcpy(out, in, heads * d * item);
        continue;
      }
      for (int64_t h = 0; h < heads; ++h)  // a strided view (e.g. a transposed projection output)
        for (int64_t i = 0; i < d; ++i) std::memcpy(out + (h * d + i) * item, in + h * s1 + i * s2, item);
    }
  });
}

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be alike contiguous [num_blocks, page, kv_heads, head_dim]");
  const int64_t n = slot_mapping.size(0);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == n && v.size(0) == n && k.size(1) == k_cache.size(2) &&
                  v.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) && v.size(2) == k_cache.size(3),
              "k and v must be [num_tokens, kv_heads, head_dim] like the caches' rows");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "k, v and the caches must have one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1, "slot_mapping must be int64");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sp[t] < capacity, "slot_mapping[", t, "] = ", sp[t], " is past the cache (", capacity, " slots)");
  store_rows(k, k_cache, sp, n);
  store_rows(v, v_cache, sp, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("store_kv", &store_kv); }
