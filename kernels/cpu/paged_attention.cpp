// Decode attention over the paged KV cache for AVX2 CPUs: one query token per sequence, K/V rows read in place
// through the block table (no gather copy). One task per (sequence, KV head): its H / KVH query heads share each
// K and V row read. Within a task every sum runs in token order, so a sequence's result depends on its own query,
// cache and context length only: not on the batch, its position in it, the table width or the thread count.
// The cache holds float32 or float16 K/V (float16 halves what a step reads, as llama.cpp's default cache does);
// either is widened to float32 as it is loaded, and every sum runs in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using tokenmill::hsum;

// e^x for x <= 0 (scores minus their max). Below -87.3 the result would be subnormal; it is clamped there (~1e-38,
// nothing next to the max's 1).
inline __m256 exp_nonpositive(__m256 x) {
  return tokenmill::exp_unclamped(_mm256_max_ps(x, _mm256_set1_ps(-87.33f)));
}

template <typename T>
struct Cache {
  const T* k;
  const T* v;
  int64_t block_stride, slot_stride, head_stride, page;
};

// 8 cache elements as float32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

constexpr int kTokens = 8;  // tokens per step: one lane each in the score vector

// Row pointers of one KV head for tokens t .. t + 7 through the block table; past the context the last token's row
// is repeated (its score is masked, its weight is 0). Each token's row one page on is prefetched: a sequence's
// pages lie anywhere in the cache, where the hardware prefetcher cannot follow.
template <typename T>
inline void rows_at(const T* base, const Cache<T>& c, const int32_t* table, int64_t t, int64_t len, int64_t d,
                    const T** rows) {
  constexpr int64_t line = 64 / sizeof(T);  // elements per cache line
  int64_t block = t / c.page, slot = t % c.page;
  const T* last = nullptr;
  for (int j = 0; j < kTokens; ++j) {
    if (t + j < len) {
      last = base + table[block] * c.block_stride + slot * c.slot_stride;
      if (t + j + c.page < len) {  // the same slot one page on
        const T* next = base + table[block + 1] * c.block_stride + slot * c.slot_stride;
        for (int64_t b = 0; b < d; b += line) _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T0);
      }
      if (++slot == c.page) slot = 0, ++block;
    }
    rows[j] = last;
  }
}

// The 8 lanes' sums of a[0..7], lane j = sum of a[j]: a fixed tree of horizontal adds.
inline __m256 sum8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Query heads q [group, d] of one KV head attending to `len` tokens; out [group, d]. scores: group rows of
// `padded` floats, acc: group * d floats. Every output is a fixed function of this sequence's data.
template <int HN, int CW, typename T>
void attend_heads(const float* q, float* out, int64_t group, int64_t d, const Cache<T>& c, int64_t kv_head,
                  const int32_t* table, int64_t len, float scale, float* scores, int64_t padded, float* acc) {
  const T* kb = c.k + kv_head * c.head_stride;
  const T* vb = c.v + kv_head * c.head_stride;
  const T* rows[kTokens];
  for (int64_t t = 0; t < len; t += kTokens) {
    rows_at(kb, c, table, t, len, d, rows);
    for (int64_t h = 0; h < group; ++h) {
      __m256 dot[kTokens];
      for (int j = 0; j < kTokens; ++j) dot[j] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + h * d + i);
        for (int j = 0; j < kTokens; ++j) dot[j] = _mm256_fmadd_ps(qv, load8(rows[j] + i), dot[j]);
      }
      _mm256_storeu_ps(scores + h * padded + t, _mm256_mul_ps(sum8(dot), _mm256_set1_ps(scale)));
    }
  }
  std::vector<float> inv_sum(group);
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores + h * padded;
    const __m256 vmax = _mm256_set1_ps(*std::max_element(s, s + len));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
      __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmax));
      if (t + 8 > len) {  // the padding past the context weighs nothing
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - t)), lane);
        p = _mm256_and_ps(p, _mm256_castsi256_ps(keep));
      }
      _mm256_storeu_ps(s + t, p);
      sum = _mm256_add_ps(sum, p);
    }
    inv_sum[h] = 1.0f / hsum(sum);
  }
  std::fill(acc, acc + group * d, 0.0f);
  for (int64_t t = 0; t < len; t += kTokens) {
    rows_at(vb, c, table, t, len, d, rows);
    for (int64_t h0 = 0; h0 < group; h0 += HN) {
      const float* p = scores + h0 * padded + t;
      int64_t c0 = 0;
      auto weigh = [&](auto width) {  // acc[h0 .. h0 + HN][c0 .. c0 + 8 width] += p * v, over the 8 tokens
        constexpr int W = decltype(width)::value;
        __m256 a[HN][W];
        for (int h = 0; h < HN; ++h)
          for (int w = 0; w < W; ++w) a[h][w] = _mm256_loadu_ps(acc + (h0 + h) * d + c0 + 8 * w);
        for (int j = 0; j < kTokens; ++j) {
          __m256 ph[HN];
          for (int h = 0; h < HN; ++h) ph[h] = _mm256_set1_ps(p[h * padded + j]);
          for (int w = 0; w < W; ++w) {
            const __m256 vv = load8(rows[j] + c0 + 8 * w);
            for (int h = 0; h < HN; ++h) a[h][w] = _mm256_fmadd_ps(ph[h], vv, a[h][w]);
          }
        }
        for (int h = 0; h < HN; ++h)
          for (int w = 0; w < W; ++w) _mm256_storeu_ps(acc + (h0 + h) * d + c0 + 8 * w, a[h][w]);
      };
      for (; c0 + 8 * CW <= d; c0 += 8 * CW) weigh(std::integral_constant<int, CW>());
      for (; c0 < d; c0 += 8) weigh(std::integral_constant<int, 1>());
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    const __m256 inv = _mm256_set1_ps(inv_sum[h]);
    for (int64_t i = 0; i < d; i += 8)
      _mm256_storeu_ps(out + h * d + i, _mm256_mul_ps(_mm256_loadu_ps(acc + h * d + i), inv));
  }
}

template <typename T>
void attend(const float* q, float* out, int64_t group, int64_t d, const Cache<T>& c, int64_t kv_head,
            const int32_t* table, int64_t len, float scale, std::vector<float>& buffer) {
  if (len == 0) {
    std::fill(out, out + group * d, 0.0f);
    return;
  }
  const int64_t padded = (len + kTokens - 1) / kTokens * kTokens;
  buffer.resize(group * (padded + d));
  float* scores = buffer.data();
  float* acc = scores + group * padded;
  // heads per V step: 3 x 2 or 2 x 4 or 1 x 4 accumulators (of 16 registers); a function of the group size only
  if (group % 3 == 0) attend_heads<3, 2>(q, out, group, d, c, kv_head, table, len, scale, scores, padded, acc);
  else if (group % 2 == 0) attend_heads<2, 4>(q, out, group, d, c, kv_head, table, len, scale, scores, padded, acc);
  else attend_heads<1, 4>(q, out, group, d, c, kv_head, table, len, scale, scores, padded, acc);
}

// The caches, checked against q [rows, heads, head_dim].
template <typename T>
Cache<T> cache_of(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be [rows, heads, head_dim] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.strides() == v_cache.strides(),
              "k_cache and v_cache must be alike [num_blocks, page, kv_heads, head_dim], float32 or float16");
  TORCH_CHECK(k_cache.stride(3) == 1, "the caches' head_dim must be contiguous");
  const int64_t heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % 8 == 0, "head_dim must match the caches' and be a multiple of 8, got ", d);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (",
              kv_heads, ")");
  return Cache<T>{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), k_cache.stride(0), k_cache.stride(1),
                  k_cache.stride(2), k_cache.size(1)};
}

// Calls fn(Cache<float>) or fn(Cache<at::Half>) for the caches' dtype.
template <typename Fn>
void with_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, Fn&& fn) {
  if (k_cache.scalar_type() == at::kFloat) return fn(cache_of<float>(q, k_cache, v_cache));
  TORCH_CHECK(k_cache.scalar_type() == at::kHalf, "the caches must be float32 or float16, got ",
              k_cache.scalar_type());
  fn(cache_of<at::Half>(q, k_cache, v_cache));
}

// Every sequence's context fits its table row and the table rows it reads name blocks of the cache. Checked before
// the parallel region: an exception inside it is costly.
void check_tables(const int32_t* tables, int64_t width, const int32_t* lens, int64_t batch, int64_t page,
                  int64_t num_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= width * page, "context_lens[", b, "] = ", lens[b], " is outside 0..",
                width * page, " (block table width ", width, " x page ", page, ")");
    for (int64_t i = 0; i < (lens[b] + page - 1) / page; ++i)
      TORCH_CHECK(tables[b * width + i] >= 0 && tables[b * width + i] < num_blocks, "block_tables[", b, ", ", i,
                  "] = ", tables[b * width + i], " is not a block of the cache (", num_blocks, ")");
  }
}

void check_batch(const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t batch) {
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && block_tables.scalar_type() == at::kInt,
              "block_tables must be [batch, max_blocks] int32");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == batch && context_lens.scalar_type() == at::kInt,
              "context_lens must be [batch] int32");
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  at::Tensor out;
  with_cache(q, k_cache, v_cache, [&](const auto& c) {
    const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(2);
    check_batch(block_tables, context_lens, batch);
    const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
    const int32_t* tp = tables.data_ptr<int32_t>();
    const int32_t* lp = lens.data_ptr<int32_t>();
    const int64_t width = tables.size(1);
    check_tables(tp, width, lp, batch, c.page, k_cache.size(0));
    out = at::empty_like(qc);
    const float* qp = qc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t group = heads / kv_heads;
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        const int64_t offset = (b * heads + h * group) * d;
        attend(qp + offset, op + offset, group, d, c, h, tp + b * width, lp[b], static_cast<float>(scale), scores);
      }
    });
  });
  return out;
}

// Causal attention of a flat batch of query chunks whose K/V are already in the cache: sequence b owns q rows
// cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and has context_lens[b] tokens, so its row r sits at position
// p = context_lens[b] - n_b + r. Each (row, KV head) runs the decode routine with context p + 1: a token's output is
// bit for bit the one decode attention gives it, however its sequence was split into chunks or steps.
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                                   const at::Tensor& block_tables, double scale) {
  at::Tensor out;
  with_cache(q, k_cache, v_cache, [&](const auto& c) {
    const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k_cache.size(2);
    TORCH_CHECK(context_lens.dim() == 1, "context_lens must be [batch] int32");
    const int64_t batch = context_lens.size(0);
    check_batch(block_tables, context_lens, batch);
    TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == batch + 1 &&
                    cu_seqlens_q.scalar_type() == at::kInt,
                "cu_seqlens_q must be [batch + 1] int32");
    const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
    const at::Tensor cu = cu_seqlens_q.contiguous();
    const int32_t* tp = tables.data_ptr<int32_t>();
    const int32_t* lp = lens.data_ptr<int32_t>();
    const int32_t* cp = cu.data_ptr<int32_t>();
    const int64_t width = tables.size(1);
    check_tables(tp, width, lp, batch, c.page, k_cache.size(0));
    TORCH_CHECK(cp[0] == 0 && cp[batch] == rows, "cu_seqlens_q must run from 0 to the ", rows, " rows of q, got ",
                cp[0], " .. ", cp[batch]);
    for (int64_t b = 0; b < batch; ++b)
      TORCH_CHECK(cp[b] <= cp[b + 1] && cp[b + 1] - cp[b] <= lp[b], "sequence ", b, " has query rows ", cp[b], " .. ",
                  cp[b + 1], " (cu_seqlens_q) but context_lens[", b, "] = ", lp[b]);
    std::vector<int64_t> seq(rows);
    for (int64_t b = 0; b < batch; ++b) std::fill(seq.begin() + cp[b], seq.begin() + cp[b + 1], b);
    // each task's cost, about its context, summed: the parallel region splits that sum evenly, so threads share
    // the long rows at the end of a causal chunk fairly
    std::vector<int64_t> start(rows * kv_heads + 1, 0);
    auto context = [&](int64_t r) { return lp[seq[r]] - (cp[seq[r] + 1] - r) + 1; };  // p + 1
    for (int64_t task = 0; task < rows * kv_heads; ++task)
      start[task + 1] = start[task] + context(task / kv_heads) + kTokens;
    out = at::empty_like(qc);
    const float* qp = qc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t group = heads / kv_heads;
    at::parallel_for(0, start.back(), 4096, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      // the tasks that start in [begin, end)
      int64_t task = std::lower_bound(start.begin(), start.end() - 1, begin) - start.begin();
      for (; task < rows * kv_heads && start[task] < end; ++task) {
        const int64_t r = task / kv_heads, h = task % kv_heads;
        const int64_t offset = (r * heads + h * group) * d;
        attend(qp + offset, op + offset, group, d, c, h, tp + seq[r] * width, context(r), static_cast<float>(scale),
               scores);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
        "Tensor context_lens, Tensor block_tables, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}
