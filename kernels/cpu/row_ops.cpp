// The per-token float ops of a decoder layer for AVX2 CPUs: RMSNorm (+ residual), SiLU-and-mul, rotary embedding.
// Each output row is computed from its own input row (and weight / cos / sin row) by a fixed sequence of
// instructions that depends on the row length only, so a token's result is bit-identical whatever the other rows of
// the call, its place among them and the thread count: eager prefill and compiled decode run this same code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

// The rows of a 2-D [rows, D] or 3-D [n, heads, D] float32 tensor at any strides of the leading dims (e.g. a head
// view of a fused projection's output); the tensor must outlive them.
struct Rows {
  const float* data;
  int64_t count, inner, outer_stride, inner_stride, d;
  const float* operator[](int64_t r) const { return data + (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

// x itself when its last dim is contiguous, else a contiguous copy (a transposed projection output,
// models/cpu_linear.py): the same values, so the same results.
at::Tensor with_contiguous_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, name, " must be [rows, dim] or [n, heads, dim], got ", x.sizes());
  return x.stride(-1) == 1 || x.size(-1) <= 1 ? x : x.contiguous();
}

Rows rows_of(const at::Tensor& x) {
  const bool flat = x.dim() == 2;
  const int64_t d = x.size(-1);
  return Rows{x.data_ptr<float>(), d ? x.numel() / d : 0, flat ? 1 : x.size(1), x.stride(0), flat ? 0 : x.stride(1),
              d};
}

// Rows per task: about 16K floats, so that a decode step's few rows run on the calling thread, without the
// parallel region's start-up.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// The lanes of one vector of a row: all 8, or those below the row's end in its last, partial vector.
struct Lanes {
  __m256i mask;
  bool all;
};

inline __m256 load(const float* p, Lanes l) { return l.all ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, l.mask); }
inline void store(float* p, Lanes l, __m256 v) {
  if (l.all) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, l.mask, v);
}

// f(i, lanes) for the vectors at i = from, from + 8, .. of a row of d floats.
template <typename F>
inline void each_vector(int64_t d, F f, int64_t from = 0) {
  int64_t i = from;
  for (; i + 8 <= d; i += 8) f(i, Lanes{_mm256_setzero_si256(), true});
  if (i < d) f(i, Lanes{tokenmill::lanes_below(d - i), false});
}

// ---- RMSNorm ------------------------------------------------------------------------------------------------------

// out = x * (1 / sqrt(mean(x^2) + eps)) * weight, for one row.
inline void norm_row(const float* x, const float* weight, float* out, int64_t d, float eps) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    a0 = _mm256_fmadd_ps(v0, v0, a0), a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2), a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  each_vector(d, [&](int64_t j, Lanes m) {
    const __m256 v = load(x + j, m);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }, i);
  const float sum = tokenmill::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  const __m256 r = _mm256_set1_ps(1.0f / std::sqrt(sum / static_cast<float>(d) + eps));
  each_vector(d, [&](int64_t i, Lanes m) {
    store(out + i, m, _mm256_mul_ps(_mm256_mul_ps(load(x + i, m), r), load(weight + i, m)));
  });
}

at::Tensor check_weight(const at::Tensor& weight, int64_t d) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.scalar_type() == at::kFloat,
              "weight must be [", d, "] float32 like x's last dim, got ", weight.sizes(), " ", weight.scalar_type());
  return weight.contiguous();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xc = with_contiguous_rows(x, "x");
  const Rows rows = rows_of(xc);
  const at::Tensor w = check_weight(weight, rows.d);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows.count, grain(rows.d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(rows[r], wp, op + r * rows.d, rows.d, static_cast<float>(eps));
  });
  return out;
}

// new_residual = residual + x, out = rms_norm(new_residual): a pre-norm decoder layer's residual stream.
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have one shape, got ", x.sizes(), " and ",
              residual.sizes());
  const at::Tensor xc = with_contiguous_rows(x, "x"), rc = with_contiguous_rows(residual, "residual");
  const Rows xs = rows_of(xc), rs = rows_of(rc);
  const at::Tensor w = check_weight(weight, xs.d);
  at::Tensor out = at::empty(x.sizes(), x.options()), sum = at::empty(x.sizes(), x.options());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  const int64_t d = xs.d;
  at::parallel_for(0, xs.count, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = xs[r], *rr = rs[r];
      float* s = sp + r * d;
      each_vector(d, [&](int64_t i, Lanes m) { store(s + i, m, _mm256_add_ps(load(rr + i, m), load(xr + i, m))); });
      norm_row(s, wp, op + r * d, d, static_cast<float>(eps));
    }
  });
  return {out, sum};
}

// ---- SiLU-and-mul -------------------------------------------------------------------------------------------------

// silu(g) = g / (1 + e^-g); e^-g clamped to its float range, where the quotient is g (g > 87) or ~0 (g < -88).
inline __m256 silu(__m256 g) {
  const __m256 minus = _mm256_sub_ps(_mm256_setzero_ps(), g);
  const __m256 e = tokenmill::exp_unclamped(_mm256_min_ps(_mm256_max_ps(minus, _mm256_set1_ps(-87.33f)),
                                                          _mm256_set1_ps(88.0f)));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  const at::Tensor xc = with_contiguous_rows(x, "x");
  const Rows rows = rows_of(xc);
  TORCH_CHECK(rows.d % 2 == 0, "x's last dim holds gate then up and must be even, got ", rows.d);
  const int64_t d = rows.d / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = d;
  at::Tensor out = at::empty(shape, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows.count, grain(rows.d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = rows[r];
      float* o = op + r * d;
      each_vector(d, [&](int64_t i, Lanes m) {
        store(o + i, m, _mm256_mul_ps(silu(load(g + i, m)), load(g + d + i, m)));
      });
    }
  });
  return out;
}

// ---- rotary embedding ---------------------------------------------------------------------------------------------

// neox layout: dims i and i + d/2 pair up. x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and sum
// rounded on its own as the plain-torch reference rounds them (no fused multiply-add), so the two agree bit for bit.
void rotate_rows(const Rows& x, const Rows& cos, const Rows& sin, float* out, int64_t token) {
  const int64_t d = x.d, half = d / 2;
  const float* c = cos[token];
  const float* s = sin[token];
  for (int64_t h = 0; h < x.inner; ++h) {
    const float* in = x[token * x.inner + h];
    float* o = out + (token * x.inner + h) * d;
    each_vector(half, [&](int64_t i, Lanes m) {
      const __m256 x1 = load(in + i, m), x2 = load(in + half + i, m), cv = load(c + i, m), sv = load(s + i, m);
      store(o + i, m, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
      store(o + half + i, m, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
    });
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [n, heads, head_dim], got ", q.sizes(), " and ",
              k.sizes());
  const at::Tensor qc = with_contiguous_rows(q, "q"), kc = with_contiguous_rows(k, "k");
  const at::Tensor cc = with_contiguous_rows(cos, "cos"), sc = with_contiguous_rows(sin, "sin");
  const Rows qs = rows_of(qc), ks = rows_of(kc), cs = rows_of(cc), ss = rows_of(sc);
  const int64_t n = q.size(0), d = q.size(2);
  TORCH_CHECK(k.size(0) == n && k.size(2) == d && d % 2 == 0, "q and k must have one token count and one even "
              "head_dim, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == n && cos.size(1) * 2 == d,
              "cos and sin must be [n, head_dim / 2] = [", n, ", ", d / 2, "], got ", cos.sizes(), " and ",
              sin.sizes());
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  float* qp = qo.data_ptr<float>();
  float* kp = ko.data_ptr<float>();
  at::parallel_for(0, n, grain((q.size(1) + k.size(1)) * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate_rows(qs, cs, ss, qp, t);
      rotate_rows(ks, cs, ss, kp, t);
    }
  });
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_residual(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_residual", &rms_norm_residual);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
