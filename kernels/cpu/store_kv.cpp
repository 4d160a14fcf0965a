// The paged K/V store for the CPU decode step: token i's K and V rows go to cache slot slot_mapping[i] (slot s is
// row s % page of block s / page); a negative slot (a padding token) writes nothing. An op of its own, with the
// caches declared mutated, so that torch.compile writes them in place: traced as index_copy_ on views of the
// caches, inductor copied each layer's whole cache back every step. A float16 cache takes float32 rows, rounded to
// nearest-even as they are stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstring>

namespace {

// Calls copy(t, offset) for every token t with a slot, offset being its row's first element in the cache.
template <typename Copy>
void for_each_slot(const at::Tensor& cache, const int64_t* slots, int64_t n, Copy&& copy) {
  const int64_t page = cache.size(1), block = cache.stride(0), row = cache.stride(1);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      if (slots[t] >= 0) copy(t, (slots[t] / page) * block + (slots[t] % page) * row);
  });
}

// Rows of the cache's own dtype, copied as bytes.
void store_rows(const at::Tensor& x, const at::Tensor& cache, const int64_t* slots, int64_t n) {
  const int64_t heads = cache.size(2), d = cache.size(3), item = cache.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t s0 = x.stride(0) * item, s1 = x.stride(1) * item, s2 = x.stride(2) * item;
  const bool contiguous_rows = x.stride(2) == 1 && x.stride(1) == d;
  for_each_slot(cache, slots, n, [&](int64_t t, int64_t offset) {
    char* out = dst + offset * item;
    const char* in = src + t * s0;
    if (contiguous_rows) {
      std::memcpy(out, in, heads * d * item);
      return;
    }
    for (int64_t h = 0; h < heads; ++h)  // a strided view (e.g. a transposed projection output)
      for (int64_t i = 0; i < d; ++i) std::memcpy(out + (h * d + i) * item, in + h * s1 + i * s2, item);
  });
}

// float32 rows into a float16 cache, each value rounded to nearest-even (F16C, or c10's conversion when strided).
void store_half_rows(const at::Tensor& x, const at::Tensor& cache, const int64_t* slots, int64_t n) {
  const int64_t heads = cache.size(2), d = cache.size(3);
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const float* src = x.data_ptr<float>();
  at::Half* dst = cache.data_ptr<at::Half>();
  for_each_slot(cache, slots, n, [&](int64_t t, int64_t offset) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = src + t * s0 + h * s1;
      at::Half* out = dst + offset + h * d;
      if (s2 == 1 && d % 8 == 0) {
        for (int64_t i = 0; i < d; i += 8)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                           _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        for (int64_t i = 0; i < d; ++i) out[i] = static_cast<at::Half>(in[i * s2]);
      }
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
  const bool half = k_cache.scalar_type() == at::kHalf && k.scalar_type() == at::kFloat;
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (half || k.scalar_type() == k_cache.scalar_type()),
              "k and v must have the caches' dtype, or be float32 for float16 caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1, "slot_mapping must be int64");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sp[t] < capacity, "slot_mapping[", t, "] = ", sp[t], " is past the cache (", capacity, " slots)");
  const auto store = half ? store_half_rows : store_rows;
  store(k, k_cache, sp, n);
  store(v, v_cache, sp, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("store_kv", &store_kv); }
