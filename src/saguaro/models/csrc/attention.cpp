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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// exp(x) for x <= 0 (scores minus their maximum), -inf -> 0: x = n ln2 + r with |r| <= ln2/2, e^r by
// its Taylor series to r^7 (relative error < 2e-8 on that range), times 2^n. Elementwise, so the order
// of anything does not enter.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512 e = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), e);
}

// out lane j = the sum of the 16 lanes of d[j], by one tree for every j: within each 128-bit lane
// (x0 + x2) + (x1 + x3), then across them (L0 + L1) + (L2 + L3). Transposing as it adds costs ~3 ops a
// sum where a horizontal add of each vector costs ~8.
inline __m512 sum_each(const __m512 (&d)[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Which of keys [s0, s0 + n) a row may see, as 16 mask bits.
inline __mmask16 seen_bits(const bool* allowed, int64_t s0, int64_t n) {
  const __mmask16 live = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __m128i bytes = _mm_maskz_loadu_epi8(live, allowed + s0);
  return _mm_test_epi8_mask(bytes, bytes);
}

// A row's scores [0, S) -> exp(score - top) in place; returns 1 / their sum (key s summed in lane s % 16).
inline float exponentiate(float* scores, int64_t S, float top) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 lanes = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 live = S - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (S - s)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, scores + s);
    const __m512 p = exp_nonpositive(_mm512_sub_ps(x, shift));
    _mm512_mask_storeu_ps(scores + s, live, p);
    lanes = _mm512_add_ps(lanes, p);
  }
  const float total = _mm512_reduce_add_ps(lanes);
  return total > 0.0f ? 1.0f / total : 0.0f;
}

// float32: R query rows (D = NV * 16 each) that share one key/value head, against keys [0, S); row r
// may see key s where allowed[r][s]. Keys go 16 at a time, and a row's 16 scores are 16 fixed 16-lane dot
// products (FMAs over keys loaded once for all R rows) summed by sum_each. The softmax total sums key s
// in lane s % 16; values are accumulated key by key in index order. None of that depends on the other
// rows, so a row's output is the same whatever rows share the call. Keys no row may see are never read,
// and a score a row may not see is -inf whatever its key held.
template <typename T, int NV, int R>
void attend_rows(const T* const* q, const T* keys, const T* values, const bool* const* allowed, int64_t S,
                 float scale, float* const* scores, T* const* out) {
  constexpr int64_t D = NV * 16;
  const __m512 none = _mm512_set1_ps(-INFINITY), scales = _mm512_set1_ps(scale);
  __m512 tops[R];
  for (int r = 0; r < R; ++r) tops[r] = none;
  alignas(64) float widened[16][D];  // the chunk's keys, read once for all rows
  for (int64_t s0 = 0; s0 < S; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, S - s0);
    const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    __mmask16 seen[R], any = 0;
    for (int r = 0; r < R; ++r) any |= seen[r] = seen_bits(allowed[r], s0, n);
    if (!any) {
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(scores[r] + s0, live, none);
      continue;
    }
    for (int j = 0; j < 16; ++j)
      for (int i = 0; i < NV; ++i)
        _mm512_store_ps(widened[j] + 16 * i, (any >> j) & 1 ? load16(keys + (s0 + j) * D + 16 * i) : _mm512_setzero_ps());
    for (int r = 0; r < R; ++r) {
      if (!seen[r]) {
        _mm512_mask_storeu_ps(scores[r] + s0, live, none);
        continue;
      }
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) {
        dots[j] = _mm512_mul_ps(_mm512_loadu_ps(q[r]), _mm512_load_ps(widened[j]));
        for (int i = 1; i < NV; ++i)
          dots[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + 16 * i), _mm512_load_ps(widened[j] + 16 * i), dots[j]);
      }
      const __m512 chunk = _mm512_mask_blend_ps(seen[r], none, _mm512_mul_ps(sum_each(dots), scales));
      _mm512_mask_storeu_ps(scores[r] + s0, live, chunk);
      tops[r] = _mm512_max_ps(tops[r], chunk);
    }
  }
  float top[R];
  for (int r = 0; r < R; ++r) top[r] = _mm512_reduce_max_ps(tops[r]);
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = exponentiate(scores[r], S, top[r]);
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    bool any = false;
    for (int r = 0; r < R; ++r) any |= allowed[r][s];
    if (!any) continue;
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = load16(values + s * D + 16 * i);
    for (int r = 0; r < R; ++r) {
      if (!allowed[r][s]) continue;
      const __m512 p = _mm512_set1_ps(scores[r][s]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(p, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) store16(out[r] + 16 * i, _mm512_mul_ps(acc[r][i], _mm512_set1_ps(inv[r])));
}

// 16 registers of 16 int32 -> their transpose (register p gets element p of each): 64 shuffles.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r_2i[c], r_2i+1[c], ...) for c = 0, 1 and 2, 3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // lanes: columns c and 8 + c (t[c]) or 4 + c and 12 + c (t[4 + c]) of rows 0-7
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);
  }
}

// Scores of RG query rows against one chunk of 16 keys held transposed (kt[p], lane j: the bfloat16 pair p
// of key j): per row, two VDPBF16PS chains over the even and the odd pairs, added. The same operations
// for every row whatever rows come with it.
template <int P, int RG>
void chunk_scores(const int32_t* const* qpairs, const __m512i* kt, __m512* dots) {
  __m512 even[RG], odd[RG];
  for (int r = 0; r < RG; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  for (int p = 0; p < P; p += 2) {
    const __m512bh a = (__m512bh)kt[p], b = (__m512bh)kt[p + 1];
    for (int r = 0; r < RG; ++r) {
      even[r] = _mm512_dpbf16_ps(even[r], a, (__m512bh)_mm512_set1_epi32(qpairs[r][p]));
      odd[r] = _mm512_dpbf16_ps(odd[r], b, (__m512bh)_mm512_set1_epi32(qpairs[r][p + 1]));
    }
  }
  for (int r = 0; r < RG; ++r) dots[r] = _mm512_add_ps(even[r], odd[r]);
}

constexpr int kScoreRows = 4;  // rows scored together: 2 * kScoreRows chains cover VDPBF16PS's latency

template <int P>
using ChunkScores = void (*)(const int32_t* const*, const __m512i*, __m512*);

template <int P>
constexpr ChunkScores<P> kChunkScores[kScoreRows] = {chunk_scores<P, 1>, chunk_scores<P, 2>, chunk_scores<P, 3>,
                                                     chunk_scores<P, 4>};

// A row's scores [0, S) -> exp(score - top) rounded to bfloat16, written to probs [0, S] (probs[S] = 0, so
// the last pair of an odd span is whole); returns 1 / the sum of the rounded values (key s summed in lane
// s % 16), so the weights the values get sum to one as they are used.
inline float exponentiate_bf16(const float* scores, int64_t S, float top, uint16_t* probs) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 lanes = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 live = S - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (S - s)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, scores + s);
    const __m256i p = (__m256i)_mm512_cvtneps_pbh(exp_nonpositive(_mm512_sub_ps(x, shift)));
    _mm256_mask_storeu_epi16(probs + s, live, p);
    lanes = _mm512_add_ps(lanes, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(p), 16)));
  }
  probs[S] = 0;
  const float total = _mm512_reduce_add_ps(lanes);
  return total > 0.0f ? 1.0f / total : 0.0f;
}

// Values of keys [0, S) weighted by RG rows' bfloat16 probabilities, a pair of keys (2j, 2j + 1) per
// VDPBF16PS: the two keys' values are interleaved once for all rows (a register of 16 dimension pairs),
// and each row adds p[2j] v[2j] + p[2j+1] v[2j+1], in pair index order, over the pairs any row of the
// group sees a key of. Where a row sees no key of a pair, or one, the weights it may not see are exactly
// 0 and the values finite (a key some row sees is written; one no row of the group sees is read as
// zero), so those products are zeros that leave its sum bitwise as it was (VDPBF16PS flushes denormal
// results, so a sum is never denormal, and never -0). A row's output is thus the same whatever rows
// share the call. Half the multiply instructions of one float FMA per key and dimension.
template <int NV, int RG>
void weigh_values(const at::BFloat16* values, int64_t S, const __mmask16* const* seen, const uint16_t* const* p,
                  const float* inv, at::BFloat16* const* out) {
  constexpr int64_t D = NV * 16;
  constexpr int kHalves = NV / 2;  // 32 bfloat16 of a value per register
  __m512 acc[RG][NV];
  for (int r = 0; r < RG; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c * 16 < S; ++c) {
    uint32_t any = 0;
    for (int r = 0; r < RG; ++r) any |= seen[r][c];
    for (uint32_t pairs = (any | (any >> 1)) & 0x5555; pairs; pairs &= pairs - 1) {
      const int bit = __builtin_ctz(pairs);
      const int64_t s = c * 16 + bit;  // even
      const __mmask32 first = -((any >> bit) & 1u), second = -((any >> (bit + 1)) & 1u);
      __m512i mixed[NV];
#pragma GCC unroll 4
      for (int h = 0; h < kHalves; ++h) {
        const __m512i a = _mm512_maskz_loadu_epi16(first, values + s * D + 32 * h);
        const __m512i b = _mm512_maskz_loadu_epi16(second, values + (s + 1) * D + 32 * h);
        mixed[2 * h] = _mm512_unpacklo_epi16(a, b);  // lane 4L + j: dimension 32h + 8L + j of both keys
        mixed[2 * h + 1] = _mm512_unpackhi_epi16(a, b);  // dimension 32h + 8L + 4 + j
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p[r] + s));
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)mixed[i], w);
      }
    }
  }
  // Back to dimension order: 16 dimensions from the low (a) and high (b) halves of an interleave.
  const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i next16 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 4  // every index of acc a constant, so the accumulators stay in registers in the loop above
  for (int r = 0; r < RG; ++r) {
    const __m512 scale = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 4
    for (int h = 0; h < kHalves; ++h) {
      const __m512 lo = acc[r][2 * h], hi = acc[r][2 * h + 1];
      store16(out[r] + 32 * h, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first16, hi), scale));
      store16(out[r] + 32 * h + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, next16, hi), scale));
    }
  }
}

// Rows weighed together: NV * rows accumulators and NV interleaved values in registers.
template <int NV>
constexpr int kValueRows = NV == 4 ? 4 : 2;

template <int NV>
using WeighValues = void (*)(const at::BFloat16*, int64_t, const __mmask16* const*, const uint16_t* const*,
                             const float*, at::BFloat16* const*);

template <int NV>  // by row count - 1; entries past kValueRows<NV> are never called
constexpr WeighValues<NV> kWeighValues[4] = {weigh_values<NV, 1>, weigh_values<NV, 2>,
                                             weigh_values<NV, std::min(3, kValueRows<NV>)>,
                                             weigh_values<NV, std::min(4, kValueRows<NV>)>};

constexpr int kBf16Rows = 8;  // query rows per task: each chunk of keys is transposed once for them all

// bfloat16: R <= kBf16Rows query rows (D = NV * 16) sharing one key/value head, against keys [0, S); row r
// may see key s where allowed[r][s]. Each chunk of 16 keys is transposed once (transpose16), so a row's 16
// scores are VDPBF16PS products over the pairs of its query (exact products, no widening) with no sum
// across lanes. A score a row may not see is -inf whatever its key held (keys past S are read as zeros);
// the rest is as in attend_rows: nothing a row computes depends on the other rows.
template <int NV>
void attend_rows_bf16(int R, const at::BFloat16* const* q, const at::BFloat16* keys, const at::BFloat16* values,
                      const bool* const* allowed, int64_t S, float scale, float* const* scores, __mmask16* seen_all,
                      uint16_t* probs, at::BFloat16* const* out) {
  constexpr int64_t D = NV * 16, P = D / 2;
  const int64_t chunks = (S + 15) / 16;
  const __m512 none = _mm512_set1_ps(-INFINITY), scales = _mm512_set1_ps(scale);
  const int32_t* qpairs[kBf16Rows];
  __mmask16* seen[kBf16Rows];
  __m512 tops[kBf16Rows];
  for (int r = 0; r < R; ++r) {
    qpairs[r] = reinterpret_cast<const int32_t*>(q[r]);
    seen[r] = seen_all + r * chunks;
    tops[r] = none;
  }
  alignas(64) __m512i kt[P];
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t s0 = c * 16, n = std::min<int64_t>(16, S - s0);
    const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    __mmask16 any = 0;
    for (int r = 0; r < R; ++r) any |= seen[r][c] = seen_bits(allowed[r], s0, n);
    if (!any) {
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(scores[r] + s0, live, none);
      continue;
    }
    for (int h = 0; h < P / 16; ++h) {
      __m512i rows[16];
      for (int j = 0; j < 16; ++j)
        rows[j] = j < n ? _mm512_loadu_si512(keys + (s0 + j) * D + 32 * h) : _mm512_setzero_si512();
      transpose16(rows);
      for (int p = 0; p < 16; ++p) kt[16 * h + p] = rows[p];
    }
    for (int r0 = 0; r0 < R; r0 += kScoreRows) {
      const int rg = std::min(kScoreRows, R - r0);
      __m512 dots[kScoreRows];
      kChunkScores<P>[rg - 1](qpairs + r0, kt, dots);
      for (int r = r0; r < r0 + rg; ++r) {
        const __m512 chunk = _mm512_mask_blend_ps(seen[r][c], none, _mm512_mul_ps(dots[r - r0], scales));
        _mm512_mask_storeu_ps(scores[r] + s0, live, chunk);
        tops[r] = _mm512_max_ps(tops[r], chunk);
      }
    }
  }
  float inv[kBf16Rows];
  const uint16_t* prob_rows[kBf16Rows];
  for (int r = 0; r < R; ++r) {
    inv[r] = exponentiate_bf16(scores[r], S, _mm512_reduce_max_ps(tops[r]), probs + r * (S + 1));
    prob_rows[r] = probs + r * (S + 1);
  }
  for (int r0 = 0; r0 < R; r0 += kValueRows<NV>) {
    const int rg = std::min(kValueRows<NV>, R - r0);
    kWeighValues<NV>[rg - 1](values, S, seen + r0, prob_rows + r0, inv + r0, out + r0);
  }
}

// x [B, H, T, D] with unit stride over D (any other strides: a verification's q, k and v are views of
// [B, T, H, D] projections), or a contiguous copy of it.
at::Tensor unit_inner_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

// cache [B, Hk, C, D] at row b, slot slots[b, t] <- x [B, Hk, T, D] at t (a copy per head: no dispatch)
void write_slots(const at::Tensor& x, at::Tensor& cache, const at::Tensor& slots) {
  TORCH_CHECK(x.scalar_type() == cache.scalar_type() && slots.scalar_type() == at::kLong,
              "saguaro_cpu::cached_attention: k and v in the cache's dtype, int64 slots");
  const int64_t B = x.size(0), Hk = x.size(1), T = x.size(2), D = x.size(3), C = cache.size(2);
  const at::Tensor where = slots.contiguous();
  const int64_t* sp = where.const_data_ptr<int64_t>();
  const at::Tensor from = unit_inner_stride(x);
  const auto* src = static_cast<const char*>(from.const_data_ptr());
  auto* dst = static_cast<char*>(cache.mutable_data_ptr());
  const int64_t size = x.element_size(), row = D * size;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = sp[b * T + t];
      TORCH_CHECK(slot >= 0 && slot < C, "saguaro_cpu::cached_attention: slot ", slot, " outside the cache");
      for (int64_t h = 0; h < Hk; ++h)
        std::memcpy(dst + ((b * Hk + h) * C + slot) * row,
                    src + (b * from.stride(0) + h * from.stride(1) + t * from.stride(2)) * size, row);
    }
}

// Rows per call of attend_rows: their accumulators fill the registers (R * NV <= 24).
template <typename T, int NV>
using AttendRows = void (*)(const T* const*, const T*, const T*, const bool* const*, int64_t, float,
                            float* const*, T* const*);

template <typename T, int NV>
constexpr AttendRows<T, NV> kAttendRows[6] = {attend_rows<T, NV, 1>, attend_rows<T, NV, 2>,
                                              attend_rows<T, NV, std::min(3, 24 / NV)>,
                                              attend_rows<T, NV, std::min(4, 24 / NV)>,
                                              attend_rows<T, NV, std::min(5, 24 / NV)>,
                                              attend_rows<T, NV, std::min(6, 24 / NV)>};

template <typename T, int NV>
void run_heads(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& mask,
               at::Tensor& out) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  constexpr int64_t D = NV * 16, kChunk = kBf16 ? kBf16Rows : 24 / NV;  // query rows per task
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2);
  const int64_t Hk = kc.size(1), C = kc.size(2), S = mask.size(-1), group = H / Hk;
  const int64_t rows = group * Tq, chunks = (rows + kChunk - 1) / kChunk;  // rows of one kv head: (head, t)
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T* qp = q.const_data_ptr<T>();  // any strides but the last
  const int64_t qb = q.stride(0), qh = q.stride(1), qt = q.stride(2);
  const T* kp = kc.const_data_ptr<T>();
  const T* vp = vc.const_data_ptr<T>();
  const bool* mp = mask.const_data_ptr<bool>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * Hk * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(kChunk * S);
    std::vector<__mmask16> seen(kBf16 ? kChunk * ((S + 15) / 16) : 0);
    std::vector<uint16_t> probs(kBf16 ? kChunk * (S + 1) : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hk * chunks), hk = (i / chunks) % Hk, c = i % chunks;
      const int64_t r0 = c * kChunk, count = std::min(kChunk, rows - r0);
      const T* qrows[kChunk];
      const bool* allowed[kChunk];
      float* score_rows[kChunk];
      T* out_rows[kChunk];
      for (int64_t r = 0; r < count; ++r) {
        const int64_t h = hk * group + (r0 + r) / Tq, t = (r0 + r) % Tq;
        const int64_t row = (b * H + h) * Tq + t;
        qrows[r] = qp + b * qb + h * qh + t * qt;
        allowed[r] = mp + (b * Tq + t) * S;
        score_rows[r] = scores.data() + r * S;
        out_rows[r] = op + row * D;
      }
      const int64_t kv = (b * Hk + hk) * C * D;
      if constexpr (kBf16)
        attend_rows_bf16<NV>(count, qrows, kp + kv, vp + kv, allowed, S, scale, score_rows, seen.data(), probs.data(),
                             out_rows);
      else
        kAttendRows<T, NV>[count - 1](qrows, kp + kv, vp + kv, allowed, S, scale, score_rows, out_rows);
    }
  });
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& mask, at::Tensor& out) {
  if (q.size(3) == 64) run_heads<T, 4>(q, kc, vc, mask, out);
  else run_heads<T, 8>(q, kc, vc, mask, out);
}

// Store k, v [B, Hk, T, D] at `slots` [B, T] of layer `layer` of the caches [L, B, Hk, C, D], then attend
// q [B, H, T, D] over the first mask.size(-1) slots where mask [B, 1, T, S] allows.
}  // namespace

namespace saguaro_cpu {

at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t layer, const at::Tensor& slots, const at::Tensor& mask) {
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k.scalar_type() == k_cache.scalar_type(),
              "saguaro_cpu::cached_attention: q, k, v and the caches must share a dtype");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "saguaro_cpu::cached_attention: head_dim must be 64 or 128");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && mask.scalar_type() == at::kBool,
              "saguaro_cpu::cached_attention: contiguous caches and a bool mask");
  at::Tensor kc = k_cache.select(0, layer), vc = v_cache.select(0, layer);
  write_slots(k, kc, slots);
  write_slots(v, vc, slots);
  const at::Tensor qc = unit_inner_stride(q), mc = mask.expand({q.size(0), 1, q.size(2), mask.size(-1)}).contiguous();
  TORCH_CHECK(mc.size(-1) <= kc.size(2), "saguaro_cpu::cached_attention: the mask spans past the cache");
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, as the op's fake promises
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
