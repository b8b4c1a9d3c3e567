// y = x @ W.T for bfloat16 x [M, K] with W in a GGUF file's own Q4_1 or Q8_0 blocks, and x quantized
// to int8 per block of 32 as llama.cpp does (its Q8_1 / Q8_0 activations), multiplied with VPDPBUSD
// (AVX512_VNNI): 64 byte products per instruction where block_linear.cpp's VDPBF16PS does 32, and the
// nibbles need two logic ops instead of a table lookup to become operands.
//
// Per row and block b of 32 inputs: s = max|x| / 127, xq = round(x / s) in [-127, 127], and the float
// sum of x (Q4_1's m term, taken exactly). Then for an output with block scale d (and min m):
//   Q4_1 (q in 0..15):    d * s * sum_k xq_k q_k + m * sum_k x_k
//   Q8_0 (q in -128..127): d * s * (sum_k xq_k (q_k + 128) - 128 * sum_k xq_k)
// (VPDPBUSD multiplies unsigned by signed bytes, so Q8_0's weights are stored shifted to unsigned, and
// the shift comes back with the activations' block sums). The integer sums are exact; the float
// steps run per output in block order, the same whatever the row count, the rows beside it or the
// thread split: a token's logits are bitwise the same decoded alone or verified among K+1, so greedy
// speculative decoding stays token-identical to plain decoding on this path too. The model computed is
// the file's weights with 8-bit activations: not the bfloat16-activation path's numbers (block_linear.cpp).
//
// Layout: outputs in groups of 16 (one int32 lane each); a 64-byte load holds, for each output of the
// group, 4 bytes of consecutive inputs (VPDPBUSD sums 4 products per lane). Q4_1 packs two such loads in
// one: the low nibbles are inputs 8i..8i+3, the high nibbles 8i+4..8i+7. Groups of 4 form a tile, whose
// blocks lie in one sequential stream ([tiles][K/32 blocks][4 groups][bytes]).

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
// Packed: 4 loads of 64 bytes, then d[16] and m[16] (float16).
template <>
struct Spec<Format::kQ4_1> {
  static constexpr int64_t kRawBytes = 20, kLoads = 4, kScaleBytes = 64, kBytes = kLoads * 64 + kScaleBytes;
  static uint8_t q(const uint8_t* block, int k) {
    const uint8_t byte = block[4 + k % 16];
    return k < 16 ? byte & 0x0F : byte >> 4;
  }
};

// Raw block: float16 d, 32 int8 q. Packed: 8 loads of 64 bytes of q + 128 (uint8), then d[16] (float16):
// as many bytes as the file's blocks.
template <>
struct Spec<Format::kQ8_0> {
  static constexpr int64_t kRawBytes = 34, kLoads = 8, kScaleBytes = 32, kBytes = kLoads * 64 + kScaleBytes;
  static uint8_t q(const uint8_t* block, int k) { return block[2 + k] ^ 0x80; }
};

template <Format F>
at::Tensor pack(const at::Tensor& raw, const char* name) {
  using S = Spec<F>;
  return pack_tiles(raw, S::kRawBytes, S::kBytes, name, [](uint8_t* dst, int64_t o, const uint8_t* block) {
    uint8_t* scales = dst + S::kLoads * 64;
    std::memcpy(scales + 2 * o, block, 2);  // d
    if constexpr (F == Format::kQ4_1) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          dst[i * 64 + 4 * o + j] = uint8_t(S::q(block, 8 * i + j) | S::q(block, 8 * i + 4 + j) << 4);
      std::memcpy(scales + 32 + 2 * o, block + 2, 2);  // m
    } else {
      for (int k = 0; k < kBlock; ++k) dst[(k / 4) * 64 + 4 * o + k % 4] = S::q(block, k);
    }
  });
}

// Row activations, quantized: int8 per input, and per block the scale, the float sum of x (Q4_1's m
// term) and 128 * the sum of the int8 values (Q8_0's shift).
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
  std::vector<int32_t> shift;
};

template <Format F>
Quantized quantize(const at::BFloat16* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  Quantized out{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<float>(M * blocks),
                std::vector<int32_t>(M * blocks)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const auto* p = reinterpret_cast<const __m256i*>(x + m * K + b * kBlock);
      const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
      const __m512 c = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p + 1)), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
      const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512 inv = _mm512_set1_ps(inverse);
      const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), ic = _mm512_cvtps_epi32(_mm512_mul_ps(c, inv));
      const __m128i qa = _mm512_cvtsepi32_epi8(ia), qc = _mm512_cvtsepi32_epi8(ic);  // nearest, ties to even
      int8_t* dst = out.q.data() + m * K + b * kBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), qa);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), qc);
      out.scale[m * blocks + b] = scale;
      out.sum[m * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
      out.shift[m * blocks + b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ic));  // |values| <= 127
    }
  return out;
}

// Rows from one row on: what a pass reads.
struct RowsView {
  const int8_t* q;
  const float *scale, *sum;
  const int32_t* shift;
};

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Block b of G consecutive groups (the first at `groups`) against rows [0, M): adds each output's block
// term to total[m][t0 + g]. Two integer chains per output (their split is exact), then the float steps
// in a fixed order, so an output's operations do not depend on M, G or which loop calls this.
template <Format F, int M, int G, int TG>
inline void block_terms(const RowsView& xq, int64_t K, const uint8_t* groups, int64_t b, int64_t blocks, int t0,
                        __m512 (&total)[M][TG]) {
  using S = Spec<F>;
  constexpr int64_t kAhead = 4 * kTileGroups * S::kBytes;  // prefetch distance: 4 blocks
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i part[M][G], part2[M][G];
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) part[m][g] = part2[m][g] = _mm512_setzero_si512();
  for (int i = 0; i < S::kLoads; ++i) {
    for (int g = 0; g < G; ++g) {
      const uint8_t* q = groups + g * S::kBytes + i * 64;
      _mm_prefetch(reinterpret_cast<const char*>(q) + kAhead, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(q);
      if constexpr (F == Format::kQ4_1) {
        const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
        for (int m = 0; m < M; ++m) {
          const int8_t* xb = xq.q + m * K + b * kBlock + 8 * i;
          part[m][g] = _mm512_dpbusd_epi32(part[m][g], lo, broadcast4(xb));
          part2[m][g] = _mm512_dpbusd_epi32(part2[m][g], hi, broadcast4(xb + 4));
        }
      } else {
        for (int m = 0; m < M; ++m) {
          const int8_t* xb = xq.q + m * K + b * kBlock + 4 * i;
          if (i % 2 == 0)
            part[m][g] = _mm512_dpbusd_epi32(part[m][g], w, broadcast4(xb));
          else
            part2[m][g] = _mm512_dpbusd_epi32(part2[m][g], w, broadcast4(xb));
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const uint8_t* scales = groups + g * S::kBytes + S::kLoads * 64;
    _mm_prefetch(reinterpret_cast<const char*>(scales) + kAhead, _MM_HINT_T0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
    __m512* out[M];
    for (int m = 0; m < M; ++m) out[m] = &total[m][t0 + g];
    if constexpr (F == Format::kQ4_1) {
      const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)));
      for (int m = 0; m < M; ++m) {
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(part[m][g], part2[m][g])), d);
        *out[m] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xq.scale[m * blocks + b]), *out[m]);
        *out[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xq.sum[m * blocks + b]), *out[m]);
      }
    } else {
      for (int m = 0; m < M; ++m) {
        const __m512i shift = _mm512_set1_epi32(xq.shift[m * blocks + b]);
        const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(part[m][g], part2[m][g]), shift);
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), d);
        *out[m] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xq.scale[m * blocks + b]), *out[m]);
      }
    }
  }
}

// Rows [0, M) against one tile; acc[m][g] gets group g's 16 outputs for row m. Up to 5 rows, as in
// block_linear.cpp, the tile is read in its stream order (all 4 groups of block b before block b + 1),
// G groups at a time; from 6 rows, G groups are swept over all blocks at a time (measured faster there,
// the running totals staying in registers). An output's operations are the same either way.
template <Format F, int M, int G>
void tile_pass(const RowsView& xq, int64_t K, const uint8_t* tile, int64_t blocks, Acc& acc) {
  using S = Spec<F>;
  if constexpr (M >= 6) {
    for (int g0 = 0; g0 < kTileGroups; g0 += G) {
      __m512 total[M][G];
      for (int m = 0; m < M; ++m)
        for (int g = 0; g < G; ++g) total[m][g] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b)
        block_terms<F, M, G, G>(xq, K, tile + (b * kTileGroups + g0) * S::kBytes, b, blocks, 0, total);
      for (int m = 0; m < M; ++m)
        for (int g = 0; g < G; ++g) acc[m][g0 + g] = total[m][g];
    }
  } else {
    __m512 total[M][kTileGroups];  // local, not acc: stores through acc might alias the rows for the compiler
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < kTileGroups; ++g) total[m][g] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 4
      for (int g0 = 0; g0 < kTileGroups; g0 += G)
        block_terms<F, M, G, kTileGroups>(xq, K, tile + (b * kTileGroups + g0) * S::kBytes, b, blocks, g0, total);
    }
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < kTileGroups; ++g) acc[m][g] = total[m][g];
  }
}

// Groups at a time per row count (2 * M * G integer partial sums in registers); only the schedule.
constexpr int groups_for(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }

template <Format F>
using TilePass = void (*)(const RowsView&, int64_t, const uint8_t*, int64_t, Acc&);

template <Format F>
constexpr TilePass<F> kTilePass[kMaxPassRows] = {
    tile_pass<F, 1, groups_for(1)>, tile_pass<F, 2, groups_for(2)>, tile_pass<F, 3, groups_for(3)>,
    tile_pass<F, 4, groups_for(4)>, tile_pass<F, 5, groups_for(5)>, tile_pass<F, 6, groups_for(6)>,
    tile_pass<F, 7, groups_for(7)>, tile_pass<F, 8, groups_for(8)>};

template <Format F>
at::Tensor int8_block_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const char* name) {
  const at::Tensor rows = checked_rows(x, packed, N, Spec<F>::kBytes, name);
  const int64_t K = rows.size(1), blocks_per_row = K / kBlock;
  const Quantized all = quantize<F>(rows.const_data_ptr<at::BFloat16>(), rows.size(0), K);
  return run_tiles(x, rows, packed, N, [&](int64_t m0, int64_t count, const uint8_t* tile, int64_t blocks, Acc& acc) {
    const RowsView view{all.q.data() + m0 * K, all.scale.data() + m0 * blocks_per_row,
                        all.sum.data() + m0 * blocks_per_row, all.shift.data() + m0 * blocks_per_row};
    kTilePass<F>[count - 1](view, K, tile, blocks, acc);
  });
}

}  // namespace

namespace saguaro_cpu {

at::Tensor q4_1_i8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return int8_block_linear<Format::kQ4_1>(x, packed, n, "q4_1_i8_linear");
}

at::Tensor q8_0_i8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return int8_block_linear<Format::kQ8_0>(x, packed, n, "q8_0_i8_linear");
}

}  // namespace saguaro_cpu

TORCH_LIBRARY_FRAGMENT(saguaro_cpu, m) {
  m.def("pack_q4_1_i8(Tensor raw) -> Tensor");
  m.def("pack_q8_0_i8(Tensor raw) -> Tensor");
  m.def("q4_1_i8_linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("q8_0_i8_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(saguaro_cpu, CPU, m) {
  m.impl("pack_q4_1_i8", [](const at::Tensor& raw) { return pack<Format::kQ4_1>(raw, "pack_q4_1_i8"); });
  m.impl("pack_q8_0_i8", [](const at::Tensor& raw) { return pack<Format::kQ8_0>(raw, "pack_q8_0_i8"); });
  m.impl("q4_1_i8_linear", &saguaro_cpu::q4_1_i8_linear);
  m.impl("q8_0_i8_linear", &saguaro_cpu::q8_0_i8_linear);
}
