// y = x @ W.T for bfloat16 x [M, K] with W kept in a GGUF file's own block format (Q4_1 or Q8_0), on
// CPUs with AVX512_BF16: the weights are read at the file's 0.6-1.1 bytes each instead of bfloat16's 2.
//
// A Q4_1 block holds 32 weights d*q + m (q in 0..15, d and m float16); a Q8_0 block 32 weights d*q
// (q in -128..127). The activations stay bfloat16 and are never quantized: for each block,
//   sum_k x_k w_k = d * sum_k x_k q_k (+ m * sum_k x_k),
// where x_k q_k is exact in float (q is a small integer, exactly a bfloat16) and sum_k x_k q_k is two
// VDPBF16PS chains (the low and the high nibbles) added in a fixed order. So the model computed is the
// file's weights as written, at no precision below them.
//
// Layout (pack_*): outputs in groups of 16, one float lane each; a register holds the 32 values
// [output o][k pair p] of one k pair for 16 outputs, made from 32 bytes with one zero-extension and a
// 16-entry lookup (vpermw) per nibble. Groups of 4 (64 outputs) form a tile, and a tile's blocks lie in
// one sequential stream ([tiles][K/32 blocks][4 groups][bytes]). Each output sums its blocks in index
// order, each block's pairs in a fixed order: nothing depends on the row count, the rows beside it,
// the pass it falls in or the thread split, so a token's logits are bitwise the same decoded alone or
// verified among K+1, and greedy speculative decoding stays token-identical to plain decoding.

#include <torch/library.h>

#include <cstring>
#include <vector>

#include "block_tiles.h"

namespace {

using namespace saguaro_blocks;

enum class Format { kQ4_1, kQ8_0 };

template <Format F>
struct Spec;

// Raw block: float16 d, float16 m, 16 bytes: byte j holds q_j (low nibble) and q_{j+16} (high).
// Packed load i (of 8) is bytes qs[2i + p] of the 16 outputs: its low nibbles are the pair (2i, 2i+1),
// its high nibbles the pair (2i+16, 2i+17). Then d[16], m[16].
template <>
struct Spec<Format::kQ4_1> {
  static constexpr int64_t kRawBytes = 20, kQuantOffset = 4, kLoads = 8, kScaleBytes = 64;
  static constexpr int64_t kBytes = kLoads * 32 + kScaleBytes;
  static constexpr int lo_pair(int i) { return i; }
  static constexpr int hi_pair(int i) { return i + 8; }
  static float lo_value(int v) { return float(v); }
  static float hi_value(int v) { return float(v); }
};

// Raw block: float16 d, 32 int8 q. Packed load j (of 16) is the pair (2j, 2j+1) of the 16 outputs,
// split q = lo + 16 * hi (lo = low nibble, hi = signed high nibble; both exact bfloat16). Then d[16].
template <>
struct Spec<Format::kQ8_0> {
  static constexpr int64_t kRawBytes = 34, kQuantOffset = 2, kLoads = 16, kScaleBytes = 32;
  static constexpr int64_t kBytes = kLoads * 32 + kScaleBytes;
  static constexpr int lo_pair(int i) { return i; }
  static constexpr int hi_pair(int i) { return i; }
  static float lo_value(int v) { return float(v); }
  static float hi_value(int v) { return float(16 * (v < 8 ? v : v - 16)); }
};

template <Format F>
at::Tensor pack(const at::Tensor& raw, const char* name) {
  using S = Spec<F>;
  return pack_tiles(raw, S::kRawBytes, S::kBytes, name, [](uint8_t* dst, int64_t o, const uint8_t* block) {
    for (int64_t i = 0; i < S::kLoads; ++i)
      for (int64_t p = 0; p < 2; ++p) dst[i * 32 + 2 * o + p] = block[S::kQuantOffset + 2 * i + p];
    std::memcpy(dst + S::kLoads * 32 + 2 * o, block, 2);  // d
    if constexpr (F == Format::kQ4_1) std::memcpy(dst + S::kLoads * 32 + 32 + 2 * o, block + 2, 2);  // m
  });
}

inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return uint16_t(bits >> 16);  // exact: the table holds small integers
}

template <Format F>
struct Tables {
  __m512i lo, hi;
  Tables() {
    alignas(64) uint16_t a[32] = {}, b[32] = {};
    for (int v = 0; v < 16; ++v) a[v] = bf16_bits(Spec<F>::lo_value(v)), b[v] = bf16_bits(Spec<F>::hi_value(v));
    lo = _mm512_load_si512(a);
    hi = _mm512_load_si512(b);
  }
};

// Rows [0, M) of x against one tile; acc[m][g] gets group g's 16 outputs for row m. The tile is read in
// its stream order, all 4 groups of block b before block b + 1 (sweeping it once per group made four
// strided passes over memory where there is one sequential one), G groups at a time: the partial sums of
// a block, two chains per output (half the latency per block), take 2 * M * G registers. Each output
// sees the same operations in the same order for every M and G.
template <Format F, int M, int G>
void tile_pass(const at::BFloat16* x, const float* xsum, int64_t K, const uint8_t* tile, int64_t blocks,
               const Tables<F>& tables, Acc& acc) {
  using S = Spec<F>;
  // Prefetch distance: 4 blocks. Non-temporal: a model's weights are read once per step and far outrun
  // the caches, so they should not evict what is read again (SD's draft weights, the KV cache). Measured
  // on the embedded pair (benchmarks/draft_after_target.py): SD's draft step right after a target step
  // took 0.47 ms instead of 0.59 (2 threads; 0.62 instead of 0.97 at 1), the target step no slower.
  constexpr int64_t kAhead = 4 * kTileGroups * S::kBytes;
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  __m512 total[M][kTileGroups];  // local, not acc: stores through acc might alias x for the compiler
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kTileGroups; ++g) total[m][g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = tile + b * kTileGroups * S::kBytes;
#pragma GCC unroll 4
    for (int g0 = 0; g0 < kTileGroups; g0 += G) {
      __m512 part[M][G], part_hi[M][G];
      for (int m = 0; m < M; ++m)
        for (int g = 0; g < G; ++g) part[m][g] = part_hi[m][g] = _mm512_setzero_ps();
      for (int i = 0; i < S::kLoads; ++i) {
        for (int g = 0; g < G; ++g) {
          const uint8_t* q = block + (g0 + g) * S::kBytes + i * 32;
          if (i % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(q) + kAhead, _MM_HINT_NTA);
          const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
          const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low4), tables.lo);
          const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tables.hi);
          for (int m = 0; m < M; ++m) {
            const auto* pairs = reinterpret_cast<const int32_t*>(x + m * K + b * kBlock);
            part[m][g] = _mm512_dpbf16_ps(part[m][g], lo, (__m512bh)_mm512_set1_epi32(pairs[S::lo_pair(i)]));
            part_hi[m][g] = _mm512_dpbf16_ps(part_hi[m][g], hi, (__m512bh)_mm512_set1_epi32(pairs[S::hi_pair(i)]));
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        const uint8_t* scales = block + (g0 + g) * S::kBytes + S::kLoads * 32;
        _mm_prefetch(reinterpret_cast<const char*>(scales) + kAhead, _MM_HINT_NTA);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
        for (int m = 0; m < M; ++m)
          total[m][g0 + g] = _mm512_fmadd_ps(_mm512_add_ps(part[m][g], part_hi[m][g]), d, total[m][g0 + g]);
        if constexpr (F == Format::kQ4_1) {
          const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)));
          for (int m = 0; m < M; ++m)
            total[m][g0 + g] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xsum[m * blocks + b]), total[m][g0 + g]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < kTileGroups; ++g) acc[m][g] = total[m][g];
}

// Groups at a time per row count, the fastest measured on an AMD EPYC (Zen 4) for the embedded target's
// linears (2 * M * G partial sums in registers, beside the lookup tables); for the Q8_0 head at one row,
// 2 groups took 1.48 ms where 4 took 1.65 (benchmarks/ab_kernels.py). Only the schedule changes with it,
// never an output's operations.
template <Format F>
constexpr int groups_for(int rows) {
  if constexpr (F == Format::kQ4_1) return rows <= 2 ? 4 : rows <= 4 ? 2 : 1;
  return rows <= 4 ? 2 : 1;
}

template <Format F>
using TilePass = void (*)(const at::BFloat16*, const float*, int64_t, const uint8_t*, int64_t, const Tables<F>&,
                          Acc&);

template <Format F>
constexpr TilePass<F> kTilePass[kMaxPassRows] = {
    tile_pass<F, 1, groups_for<F>(1)>, tile_pass<F, 2, groups_for<F>(2)>, tile_pass<F, 3, groups_for<F>(3)>,
    tile_pass<F, 4, groups_for<F>(4)>, tile_pass<F, 5, groups_for<F>(5)>, tile_pass<F, 6, groups_for<F>(6)>,
    tile_pass<F, 7, groups_for<F>(7)>, tile_pass<F, 8, groups_for<F>(8)>};

// Per row and block, the float sum of x over the block (Q4_1's m term), in a fixed order.
std::vector<float> block_sums(const at::BFloat16* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  std::vector<float> sums(M * blocks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const auto* p = reinterpret_cast<const __m256i*>(x + m * K + b * kBlock);
      const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
      const __m512 c = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p + 1)), 16));
      sums[m * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
    }
  return sums;
}

template <Format F>
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const char* name) {
  const at::Tensor rows = checked_rows(x, packed, N, Spec<F>::kBytes, name);
  const int64_t K = rows.size(1);
  const auto* xp = rows.const_data_ptr<at::BFloat16>();
  const std::vector<float> sums = F == Format::kQ4_1 ? block_sums(xp, rows.size(0), K) : std::vector<float>();
  static const Tables<F> tables;
  return run_tiles(x, rows, packed, N, [&](int64_t m0, int64_t count, const uint8_t* tile, int64_t blocks, Acc& acc) {
    kTilePass<F>[count - 1](xp + m0 * K, sums.data() + m0 * blocks, K, tile, blocks, tables, acc);
  });
}

}  // namespace

namespace saguaro_cpu {

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return block_linear<Format::kQ4_1>(x, packed, n, "q4_1_linear");
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return block_linear<Format::kQ8_0>(x, packed, n, "q8_0_linear");
}

}  // namespace saguaro_cpu

TORCH_LIBRARY_FRAGMENT(saguaro_cpu, m) {
  m.def("pack_q4_1(Tensor raw) -> Tensor");
  m.def("pack_q8_0(Tensor raw) -> Tensor");
  m.def("q4_1_linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(saguaro_cpu, CPU, m) {
  m.impl("pack_q4_1", [](const at::Tensor& raw) { return pack<Format::kQ4_1>(raw, "pack_q4_1"); });
  m.impl("pack_q8_0", [](const at::Tensor& raw) { return pack<Format::kQ8_0>(raw, "pack_q8_0"); });
  m.impl("q4_1_linear", &saguaro_cpu::q4_1_linear);
  m.impl("q8_0_linear", &saguaro_cpu::q8_0_linear);
}
