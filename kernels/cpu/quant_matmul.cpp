// Quantized matmuls for AVX2 CPUs: GGUF Q4_1 / Q8_0 weights (groups of 32 along K) against activations quantized
// per row and 32-block to int8 (Q8_1), with integer dot products and float accumulation.
//
// Packed weights (see kernels/cpu_ops.py, pack_q4_1 / pack_q8_0): the N rows are padded to a multiple of 8 and
// interleaved in blocks of 8, so that one 32-bit lane of a ymm register belongs to one weight row. For block b and
// group g, 32 bytes hold 4 consecutive k of each of the 8 rows (lane i = row 8b + i); one activation int32
// (4 int8 values) broadcast to all lanes then gives, after maddubs + madd, 8 partial dot products, one per row, so
// no horizontal sums are needed and one float lane accumulates one output.
//   Q4_1 qs [N/8, G, 128] uint8: byte 32j + 4i + t = q[8b+i, 32g+4j+t] | q[8b+i, 32g+16+4j+t] << 4  (j < 4)
//        scales [N/8, G, 16] fp16: d of the 8 rows, then m of the 8 rows
//   Q8_0 qs [N/8, G, 256] int8: byte 32c + 4i + t = q[8b+i, 32g+4c+t]  (c < 8);  scales [N/8, G, 8] fp16: d
//
// Batch invariance: every output y[m, n] is computed by the same instructions in the same order (groups in
// order, one fma for d*dx*dot and one for m*sx per group), whatever M, the tile the row falls in, or the thread:
// threads split N blocks only, never K, and there is no separate remainder path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kLanes = 8;        // weight rows per interleaved block
constexpr int64_t kTileRows = 16;    // activation rows that share one unpacked weight group
constexpr int64_t kChunkBytes = 48 * 1024;  // packed weights revisited by every row tile of one thread's chunk

struct QuantizedRows {  // activations: q int8 [M, K], d (dx) and s (dx * sum q) float [M, K / 32]
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t k;
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline __m256i broadcast4(const int8_t* p) {  // 4 int8 activations to every 32-bit lane
  // vbroadcastss: measured ~5% faster than vpbroadcastd on Zen 1
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// dx = max|x| / 127, q = round-half-even(x / dx) (0 when dx is 0), sx = dx * sum(q): the reference's exact math.
void quantize_row(const float* x, int64_t k, int8_t* q, float* dx, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 lim = _mm256_set1_ps(127.0f);
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xg + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float d = hmax(amax) / 127.0f;
    if (d == 0.0f) {
      std::memset(q + g * kGroup, 0, kGroup);
      dx[g] = sx[g] = 0.0f;
      continue;
    }
    const __m256 vd = _mm256_set1_ps(d);
    __m256i qi[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
      qi[i] = _mm256_cvtps_epi32(r);
      sum = _mm256_add_epi32(sum, qi[i]);
    }
    // two saturating packs leave the four 8-value runs as dwords 0,4 | 1,5 | 2,6 | 3,7: put them back in order
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), p);
    dx[g] = d;
    sx[g] = d * static_cast<float>(hsum_epi32(sum));
  }
}

void store_block(const float* acc, const float* bias, int64_t n0, int64_t n_valid, float* y) {
  for (int64_t i = 0; i < n_valid; ++i) y[i] = bias ? acc[i] + bias[n0 + i] : acc[i];
}

// One interleaved block of 8 weight rows against activation rows [m0, m1).
void q4_1_block(const uint8_t* qs, const uint16_t* sc, int64_t groups, const QuantizedRows& a, int64_t m0,
                int64_t m1, const float* bias, int64_t n0, int64_t n_valid, float* y, int64_t ldy) {
  alignas(32) float acc[kTileRows][kLanes] = {};
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i w[8];  // w[j]: k = 4j..4j+3 of the group, w[4 + j]: k = 16 + 4j..
    for (int j = 0; j < 4; ++j) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + g * 128 + 32 * j));
      w[j] = _mm256_and_si256(raw, low4);
      w[4 + j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    }
    const __m128i* s = reinterpret_cast<const __m128i*>(sc + g * 16);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(s));
    const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(s + 1));
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = a.q + m * a.k + g * kGroup;
      // unsigned 0..15 x signed -127..127: 16 products per int16 lane stay below 2^15, so no widening per step
      __m256i dot = _mm256_maddubs_epi16(w[0], broadcast4(x));
      for (int c = 1; c < 8; ++c) dot = _mm256_add_epi16(dot, _mm256_maddubs_epi16(w[c], broadcast4(x + 4 * c)));
      const __m256 fdot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, ones));
      const int64_t ag = m * groups + g;
      float* out = acc[m - m0];
      __m256 r = _mm256_load_ps(out);
      r = _mm256_fmadd_ps(fdot, _mm256_mul_ps(d, _mm256_set1_ps(a.d[ag])), r);
      r = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.s[ag]), r);
      _mm256_store_ps(out, r);
    }
  }
  for (int64_t m = m0; m < m1; ++m) store_block(acc[m - m0], bias, n0, n_valid, y + m * ldy + n0);
}

void q8_0_block(const int8_t* qs, const uint16_t* sc, int64_t groups, const QuantizedRows& a, int64_t m0,
                int64_t m1, const float* bias, int64_t n0, int64_t n_valid, float* y, int64_t ldy) {
  alignas(32) float acc[kTileRows][kLanes] = {};
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i* wp = reinterpret_cast<const __m256i*>(qs + g * 256);
    __m256i aw[8];  // |w|; signed x signed products as maddubs(|w|, x * sign(w))
    for (int c = 0; c < 8; ++c) aw[c] = _mm256_abs_epi8(_mm256_loadu_si256(wp + c));
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 8)));
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* x = a.q + m * a.k + g * kGroup;
      // 127 * 127 * 2 fits an int16 but two of them do not: widen every step
      __m256i dot = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i sx = _mm256_sign_epi8(broadcast4(x + 4 * c), _mm256_loadu_si256(wp + c));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[c], sx), ones));
      }
      float* out = acc[m - m0];
      const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d[m * groups + g]));
      _mm256_store_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, _mm256_load_ps(out)));
    }
  }
  for (int64_t m = m0; m < m1; ++m) store_block(acc[m - m0], bias, n0, n_valid, y + m * ldy + n0);
}

void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(x + m * k, k, q + m * k, d + m * (k / kGroup), s + m * (k / kGroup));
  });
}

at::Tensor as_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % kGroup == 0, "x's last dim must be a multiple of 32, got ", x.sizes());
  // a view costs about a microsecond (autograd's view tracking): none when x is already contiguous rows
  return x.dim() == 2 ? x.contiguous() : x.reshape({-1, x.size(-1)}).contiguous();
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8_1(const at::Tensor& x) {
  const at::Tensor x2d = as_rows(x);
  const int64_t rows = x2d.size(0), k = x2d.size(1);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor d = at::empty(with_last(x, k / kGroup), x.options());
  at::Tensor s = at::empty(with_last(x, k / kGroup), x.options());
  quantize_rows(x2d.data_ptr<float>(), rows, k, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>());
  return {q, d, s};
}

template <typename W, void (*Block)(const W*, const uint16_t*, int64_t, const QuantizedRows&, int64_t, int64_t,
                                    const float*, int64_t, int64_t, float*, int64_t)>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t n,
                        const std::optional<at::Tensor>& bias, at::ScalarType qs_type, int64_t block_bytes,
                        int64_t scale_halves, const char* name) {
  const at::Tensor x2d = as_rows(x);
  const int64_t rows = x2d.size(0), k = x2d.size(1), groups = k / kGroup;
  TORCH_CHECK(qs.scalar_type() == qs_type && qs.dim() == 3 && qs.size(1) == groups && qs.size(2) == block_bytes,
              name, ": qs must be [N/8, K/32, ", block_bytes, "] ", qs_type, " for K = ", k, ", got ", qs.sizes(),
              " ", qs.scalar_type());
  const int64_t blocks = qs.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.size(0) == blocks &&
                  scales.size(1) == groups && scales.size(2) == scale_halves,
              name, ": scales must be [N/8, K/32, ", scale_halves, "] float16, got ", scales.sizes(), " ",
              scales.scalar_type());
  TORCH_CHECK(n > (blocks - 1) * kLanes && n <= blocks * kLanes, name, ": n = ", n, " does not fit ", blocks,
              " blocks of 8 rows");
  at::Tensor b;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == n, name, ": bias must be [", n,
                "] float32");
  }
  const at::Tensor qsc = qs.contiguous(), scc = scales.contiguous();
  at::Tensor y = at::empty(with_last(x, n), x.options());
  if (rows == 0) return y;
  // x quantized once per call, shared by every weight block: q [rows, k] int8, then d and s [rows, groups] float
  at::Tensor buffer = at::empty({rows * (k + 8 * groups)}, x.options().dtype(at::kChar));
  int8_t* aq = buffer.data_ptr<int8_t>();
  float* ad = reinterpret_cast<float*>(aq + rows * k);  // k is a multiple of 32: aligned
  quantize_rows(x2d.data_ptr<float>(), rows, k, aq, ad, ad + rows * groups);
  const QuantizedRows a{aq, ad, ad + rows * groups, k};
  const W* wq = reinterpret_cast<const W*>(qsc.data_ptr());
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(scc.data_ptr());
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t per_block = groups * (block_bytes + 2 * scale_halves);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / per_block);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t c1 = std::min(end, c0 + chunk);
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int64_t m1 = std::min(rows, m0 + kTileRows);
        for (int64_t blk = c0; blk < c1; ++blk)
          Block(wq + blk * groups * block_bytes, ws + blk * groups * scale_halves, groups, a, m0, m1, bp,
                blk * kLanes, std::min(kLanes, n - blk * kLanes), yp, n);
      }
    }
  });
  return y;
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t n,
                       const std::optional<at::Tensor>& bias) {
  return quant_linear<uint8_t, q4_1_block>(x, qs, scales, n, bias, at::kByte, 128, 16, "q4_1_linear");
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t n,
                       const std::optional<at::Tensor>& bias) {
  return quant_linear<int8_t, q8_0_block>(x, qs, scales, n, bias, at::kChar, 256, 8, "q8_0_linear");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("quantize_q8_1(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("q4_1_linear(Tensor x, Tensor qs, Tensor scales, int n, Tensor? bias=None) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor qs, Tensor scales, int n, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("quantize_q8_1", &quantize_q8_1);
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
}
