// Peak per-core throughput of the vector instructions sinkdlm's CPU kernels are bound by:
// vfmadd231ps zmm (float32 FMA: the exp polynomial of softmax and remask_step, sgemm) and
// vdpbf16ps zmm (the native bfloat16 micro-kernel). Twelve independent accumulator chains cover
// the FMA latency on every core this project has seen. Built and run by cpu_throughput.py.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS 12

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// GFLOP/s of `iters` rounds of CHAINS vfmadd231ps zmm (32 flops each).
__attribute__((target("avx512f"))) static double fma_ps(long iters) {
  __m512 acc[CHAINS];
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)c);
  double start = now();
  for (long i = 0; i < iters; ++i)
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_fmadd_ps(acc[c], x, y);
  double seconds = now() - start;
  float sink = 0;  // keeps the chains live
  for (int c = 0; c < CHAINS; ++c) sink += _mm512_reduce_add_ps(acc[c]);
  if (sink == 12345.f) puts("");
  return 32.0 * CHAINS * iters / seconds * 1e-9;
}

// GFLOP/s of `iters` rounds of CHAINS vdpbf16ps zmm (32 bf16 pairs: 64 flops each).
__attribute__((target("avx512f,avx512bf16"))) static double dp_bf16(long iters) {
  __m512 acc[CHAINS];
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)c);
  double start = now();
  for (long i = 0; i < iters; ++i)
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  double seconds = now() - start;
  float sink = 0;
  for (int c = 0; c < CHAINS; ++c) sink += _mm512_reduce_add_ps(acc[c]);
  if (sink == 12345.f) puts("");
  return 64.0 * CHAINS * iters / seconds * 1e-9;
}

int main(int argc, char** argv) {
  long iters = argc > 1 ? atol(argv[1]) : 200000000L;
  int best_of = 3;
  double fma = 0, bf16 = 0;
  for (int r = 0; r < best_of; ++r) {
    double f = fma_ps(iters);
    fma = f > fma ? f : fma;
  }
  printf("{\"vfmadd231ps_zmm_gflops\": %.2f", fma);
  if (__builtin_cpu_supports("avx512bf16")) {
    for (int r = 0; r < best_of; ++r) {
      double f = dp_bf16(iters);
      bf16 = f > bf16 ? f : bf16;
    }
    printf(", \"vdpbf16ps_zmm_gflops\": %.2f", bf16);
  }
  printf("}\n");
  return 0;
}
