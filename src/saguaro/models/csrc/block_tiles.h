// What the two linears over a GGUF file's blocks share (block_linear.cpp: bfloat16 activations,
// int8_block_linear.cpp: int8): the tile layout, and the loops over it.
//
// Outputs go in groups of 16 (one float lane each), 4 groups to a tile, and a tile's blocks lie in one
// sequential stream: [tiles][K / 32 blocks][4 groups][the group's bytes for that block]. Each kernel says
// how one output's block is laid out in its group (pack_tiles) and how a pass of up to 8 rows runs over
// one tile (run_tiles); nothing here depends on the row count beyond splitting the rows into passes.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace saguaro_blocks {

constexpr int64_t kBlock = 32;      // weights per GGUF block along K
constexpr int64_t kGroup = 16;      // outputs per group (float lanes)
constexpr int64_t kTileGroups = 4;  // groups per tile
constexpr int64_t kTile = kGroup * kTileGroups;
constexpr int64_t kMaxPassRows = 8;

using Acc = __m512[kMaxPassRows][kTileGroups];  // a pass's result: [row][group] -> 16 outputs

// The file's blocks, uint8 [N, K / 32 * raw_bytes], in tiles of group_bytes per group and block; padding
// outputs stay zero. put(dst, o, block) writes output o (0..15) of the group at dst from its raw block.
template <typename Put>
at::Tensor pack_tiles(const at::Tensor& raw, int64_t raw_bytes, int64_t group_bytes, const char* name, Put put) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.size(1) % raw_bytes == 0,
              "saguaro_cpu::", name, " takes the file's blocks as uint8 [N, K / 32 * ", raw_bytes, "]");
  const at::Tensor src = raw.contiguous();
  const int64_t N = src.size(0), blocks = src.size(1) / raw_bytes, tiles = (N + kTile - 1) / kTile;
  at::Tensor packed = at::zeros({tiles, blocks, kTileGroups, group_bytes}, src.options());
  const uint8_t* in = src.const_data_ptr<uint8_t>();
  uint8_t* out = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t g = 0; g < kTileGroups; ++g) {
          uint8_t* dst = out + ((t * blocks + b) * kTileGroups + g) * group_bytes;
          for (int64_t o = 0; o < kGroup; ++o) {
            const int64_t n = t * kTile + g * kGroup + o;
            if (n >= N) break;
            put(dst, o, in + n * src.size(1) + b * raw_bytes);
          }
        }
  });
  return packed;
}

// x [..., K] bfloat16 as contiguous rows [M, K], once `packed` (group_bytes per group and block) is seen to
// fit K and N.
inline at::Tensor checked_rows(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t group_bytes,
                               const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kByte && packed.dim() == 4 &&
                  packed.is_contiguous() && packed.size(2) == kTileGroups && packed.size(3) == group_bytes,
              "saguaro_cpu::", name, " takes bfloat16 x and the result of its pack op");
  const int64_t K = x.size(-1), blocks = packed.size(1), tiles = packed.size(0);
  TORCH_CHECK(blocks * kBlock == K && tiles * kTile >= N && (tiles - 1) * kTile < N, "saguaro_cpu::", name,
              ": the packed weight does not fit x's ", K, " features and ", N, " outputs");
  return x.reshape({-1, K}).contiguous();
}

// y = rows @ W.T, bfloat16 [M, N], x's leading sizes: pass(m0, rows_here, tile, blocks, acc) leaves in
// acc[m][g] group g's outputs for row m0 + m. Each thread streams a contiguous run of tiles; every pass
// of up to 8 rows over a tile after the first reads it from the cache.
template <typename Pass>
at::Tensor run_tiles(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& packed, int64_t N, Pass pass) {
  const int64_t M = rows.size(0), blocks = packed.size(1), tiles = packed.size(0);
  const int64_t tile_bytes = blocks * kTileGroups * packed.size(3);
  at::Tensor y = at::empty({M, N}, rows.options());
  const uint8_t* wp = packed.const_data_ptr<uint8_t>();
  auto* yp = y.mutable_data_ptr<at::BFloat16>();
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    Acc acc;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxPassRows) {
        const int64_t rows_here = std::min(kMaxPassRows, M - m0);
        pass(m0, rows_here, wp + t * tile_bytes, blocks, acc);
        for (int64_t m = 0; m < rows_here; ++m)
          for (int64_t g = 0; g < kTileGroups; ++g) {
            const int64_t n = t * kTile + g * kGroup;
            if (n >= N) break;
            const __mmask16 keep = N - n >= kGroup ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
            _mm256_mask_storeu_epi16(yp + (m0 + m) * N + n, keep, (__m256i)_mm512_cvtneps_pbh(acc[m][g]));
          }
      }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace saguaro_blocks
