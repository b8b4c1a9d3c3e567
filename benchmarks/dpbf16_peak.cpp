// Peak VDPBF16PS (zmm) issue rate of one core: 12 independent accumulation chains in a loop.
//   g++ -O2 -mavx512f -mavx512bf16 benchmarks/dpbf16_peak.cpp -o /tmp/dpbf16_peak && /tmp/dpbf16_peak
// docs/results.md ("Where a verification's time goes") uses it to bound the 5-row linears.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main() {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  const long n = 200000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0; for (int j = 0; j < 12; ++j) sink += _mm512_reduce_add_ps(acc[j]);
  printf("%.3f G dpbf16/s (sink %g)\n", n * 12 / s / 1e9, sink);
}
