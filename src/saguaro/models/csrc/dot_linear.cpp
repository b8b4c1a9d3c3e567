// y = x @ w.T for bfloat16 x [M, K] and w [N, K] on CPUs with AVX512_BF16, for the small row counts of
// decoding: one token, a K+1 verification, a few draft branches.
//
// Why our own kernel: every output here is one chain of VDPBF16PS over K (lane j of a 16-lane float
// accumulator sums the pairs 2j, 2j+1 of each 32-wide chunk), then a fixed 16-lane reduction. Nothing
// in that order depends on M, on the outputs computed beside it or on the thread split, so a token's
// logits are bitwise the same decoded alone or verified among K+1, and greedy speculative decoding
// stays token-identical to plain decoding. torch's kernels do not give both that and speed: oneDNN's
// one-row bf16 kernel summed in another order than its multi-row one on one AMD EPYC of our fleet (not
// on another) and reads the weight at about half the memory bandwidth; inductor's C++ GEMM converts
// bf16 to float first and turns compute-bound at five rows (2.3x one row; AMD EPYC, 1 thread).
//
// The weight is packed once ([ceil(N/4), ceil(K/32), 4, 32], zero padded) so that a call reads it as
// one sequential stream: rows of 1-3 KB read side by side were too short for the hardware prefetcher
// (measured 18 ms for the embedded target's linears at one row against 13.5 packed; the read floor is
// ~12). Up to 6 rows share one pass over the weight.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kChunk = 32;        // bf16 values per 512-bit register
constexpr int kPackN = 4;             // outputs per packed block
constexpr int64_t kPassRows = 6;      // rows per pass over the weight: 6 x 4 accumulators fit the registers
constexpr int64_t kPrefetchBytes = 1024;

inline __m512bh load_bf16(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

inline __m512bh load_bf16_tail(const at::BFloat16* p, int64_t count) {
  const __mmask32 mask = count >= kChunk ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

at::Tensor pack_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2,
              "saguaro_cpu::pack_weight takes a bfloat16 [N, K] weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t blocks = (N + kPackN - 1) / kPackN, chunks = (K + kChunk - 1) / kChunk;
  at::Tensor padded = at::zeros({blocks * kPackN, chunks * kChunk}, weight.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  return padded.view({blocks, kPackN, chunks, kChunk}).permute({0, 2, 1, 3}).contiguous();
}

// One 32-wide chunk of K for M rows and the block's 4 outputs; tail: the chunk runs past K (masked x).
template <int M, bool kTail>
inline __attribute__((always_inline)) void dot_chunk(__m512 (&acc)[M][kPackN], const at::BFloat16* w,
                                                     const at::BFloat16* x, int64_t k, int64_t K) {
  __m512bh wv[kPackN];
  for (int j = 0; j < kPackN; ++j) wv[j] = load_bf16(w + j * kChunk);
  for (int m = 0; m < M; ++m) {
    const __m512bh xv = kTail ? load_bf16_tail(x + m * K + k, K - k) : load_bf16(x + m * K + k);
    for (int j = 0; j < kPackN; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
  }
}

// Rows [0, M) of x against packed blocks [b0, b1): y[m, n] for n in 4 * [b0, b1).
template <int M>
void dot_blocks(const at::BFloat16* x, const at::BFloat16* packed, int64_t K, int64_t N, int64_t b0,
                int64_t b1, at::BFloat16* y) {
  const int64_t chunks = (K + kChunk - 1) / kChunk, full = K / kChunk;
  for (int64_t b = b0; b < b1; ++b) {
    const at::BFloat16* w = packed + b * chunks * kPackN * kChunk;
    __m512 acc[M][kPackN];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kPackN; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c, w += kPackN * kChunk) {
      for (int64_t line = 0; line < kPackN * kChunk * 2; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + line, _MM_HINT_T0);
      dot_chunk<M, false>(acc, w, x, c * kChunk, K);
    }
    if (full < chunks) dot_chunk<M, true>(acc, w, x, full * kChunk, K);
    for (int j = 0; j < kPackN && b * kPackN + j < N; ++j)
      for (int m = 0; m < M; ++m) y[m * N + b * kPackN + j] = at::BFloat16(_mm512_reduce_add_ps(acc[m][j]));
  }
}

using DotBlocks = void (*)(const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                           at::BFloat16*);
constexpr DotBlocks kDotBlocks[kPassRows] = {dot_blocks<1>, dot_blocks<2>, dot_blocks<3>,
                                             dot_blocks<4>, dot_blocks<5>, dot_blocks<6>};

}  // namespace

namespace saguaro_cpu {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
                  packed.is_contiguous(), "saguaro_cpu::packed_linear takes bfloat16 x and a pack_weight result");
  const int64_t K = x.size(-1);
  TORCH_CHECK(packed.size(1) * kChunk >= K && packed.size(1) * kChunk < K + kChunk && packed.size(0) * kPackN >= N,
              "saguaro_cpu::packed_linear: the packed weight does not fit x's ", K, " features and ", N, " outputs");
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = rows.const_data_ptr<at::BFloat16>();
  const auto* wp = packed.const_data_ptr<at::BFloat16>();
  auto* yp = y.mutable_data_ptr<at::BFloat16>();
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  // Each thread streams a contiguous stretch of the weight, for every row of x.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += kPassRows)
      kDotBlocks[std::min(kPassRows, M - m0) - 1](xp + m0 * K, wp, K, N, b0, b1, yp + m0 * N);
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace saguaro_cpu

TORCH_LIBRARY(saguaro_cpu, m) {
  m.def("pack_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(saguaro_cpu, CPU, m) {
  m.impl("pack_weight", &pack_weight);
  m.impl("packed_linear", &saguaro_cpu::packed_linear);
}
