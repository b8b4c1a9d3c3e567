// Attention of a few queries (a decode step, a K+1 verification, draft branches) over the KV cache,
// with the cache write, for float32 and bfloat16 on AVX-512 CPUs.
//
// Why our own: a query's output must not depend on how many queries come with it nor on how many masked
// keys follow it, or greedy speculative decoding parts from plain decoding. Here each (query, key)
// score is one fixed 16-lane dot product over the head dimension, the softmax visits the allowed keys in
// index order, and masked keys are skipped (never added, so garbage in unwritten slots is never read).
// The float64 torch formulation this replaces (models/attention.py) is invariant too but took ~150 us
// per layer for one query against a ~15 ms bf16 step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(tmp[i]);  // round to nearest even, as torch does
}

// One query row (already in float) against keys [0, S) where allowed[s]; writes out[D] in T.
template <typename T>
void attend_one(const float* q, const T* keys, const T* values, const bool* allowed, int64_t S, int64_t D,
                float scale, float* scores, float* acc, T* out) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) dot = _mm512_fmadd_ps(load16(q + d), load16(keys + s * D + d), dot);
    scores[s] = _mm512_reduce_add_ps(dot) * scale;
    top = std::max(top, scores[s]);
  }
  for (int64_t d = 0; d < D; d += 16) store16(acc + d, _mm512_setzero_ps());
  float total = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    const float p = std::exp(scores[s] - top);
    total += p;
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t d = 0; d < D; d += 16)
      store16(acc + d, _mm512_fmadd_ps(pv, load16(values + s * D + d), load16(acc + d)));
  }
  const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
  for (int64_t d = 0; d < D; d += 16) store16(out + d, _mm512_mul_ps(load16(acc + d), inv));
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& mask, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hk = kc.size(1), C = kc.size(2), S = mask.size(-1), group = H / Hk;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T* qp = q.const_data_ptr<T>();
  const T* kp = kc.const_data_ptr<T>();
  const T* vp = vc.const_data_ptr<T>();
  const bool* mp = mask.const_data_ptr<bool>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * H * Tq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(S), acc(D), qf(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * Tq), h = (i / Tq) % H, t = i % Tq;
      const T* qrow = qp + i * D;
      for (int64_t d = 0; d < D; d += 16) store16(qf.data() + d, load16(qrow + d));
      const int64_t kv = (b * Hk + h / group) * C * D;
      attend_one<T>(qf.data(), kp + kv, vp + kv, mp + (b * Tq + t) * S, S, D, scale, scores.data(), acc.data(),
                    op + i * D);
    }
  });
}

// Store k, v [B, Hk, T, D] at `slots` [B, T] of layer `layer` of the caches [L, B, Hk, C, D], then attend
// q [B, H, T, D] over the first mask.size(-1) slots where mask [B, 1, T, S] allows.
}  // namespace

namespace saguaro_cpu {

at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t layer, const at::Tensor& slots, const at::Tensor& mask) {
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k.scalar_type() == k_cache.scalar_type(),
              "saguaro_cpu::cached_attention: q, k, v and the caches must share a dtype");
  TORCH_CHECK(q.size(3) % 16 == 0, "saguaro_cpu::cached_attention: head_dim must be a multiple of 16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && mask.scalar_type() == at::kBool,
              "saguaro_cpu::cached_attention: contiguous caches and a bool mask");
  at::Tensor kc = k_cache.select(0, layer), vc = v_cache.select(0, layer);
  const at::Tensor index = slots.to(at::kLong);
  for (int64_t b = 0; b < k.size(0); ++b) {  // [Hk, T, D] into [Hk, C, D] at the row's slots
    kc.select(0, b).index_copy_(1, index.select(0, b), k.select(0, b));
    vc.select(0, b).index_copy_(1, index.select(0, b), v.select(0, b));
  }
  const at::Tensor qc = q.contiguous(), mc = mask.expand({q.size(0), 1, q.size(2), mask.size(-1)}).contiguous();
  TORCH_CHECK(mc.size(-1) <= kc.size(2), "saguaro_cpu::cached_attention: the mask spans past the cache");
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kBFloat16) run<at::BFloat16>(qc, kc, vc, mc, out);
  else if (q.scalar_type() == at::kFloat) run<float>(qc, kc, vc, mc, out);
  else TORCH_CHECK(false, "saguaro_cpu::cached_attention takes float32 or bfloat16");
  return out;
}

}  // namespace saguaro_cpu

TORCH_LIBRARY_FRAGMENT(saguaro_cpu, m) {
  m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, "
        "Tensor slots, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(saguaro_cpu, CPU, m) {
  m.impl("cached_attention", &saguaro_cpu::cached_attention);
}
