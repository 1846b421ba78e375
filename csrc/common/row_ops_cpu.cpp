#include <cmath>
#include <cstring>
#include <limits>

#include "common/row_ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SINKDLM_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SINKDLM_CLONES
#endif

namespace sinkdlm::row {
namespace {

// exp for float, branch-free so the loops around it vectorise: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by a degree-6 polynomial (rel. error ~2e-7), 2^n by exponent bits.
inline float fast_exp(float x) {
  const float lo = -87.0f, hi = 88.5f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.0f : p * scale;  // below the clamp (incl. -inf): flush to exactly 0
}

}  // namespace

SINKDLM_CLONES float max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
double max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

SINKDLM_CLONES float exp_sub_sum(float* x, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = fast_exp(x[i] - m);
    s += x[i];
  }
  return s;
}
double exp_sub_sum(double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

SINKDLM_CLONES void exp_sub(float* x, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = fast_exp(x[i] - m);
}
void exp_sub(double* x, int64_t n, double m) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - m);
}

SINKDLM_CLONES void scale(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
void scale(double* x, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

SINKDLM_CLONES void softmax_grad(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}
void softmax_grad(const double* p, double* dp, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

SINKDLM_CLONES float dot(const float* x, const float* y, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}
double dot(const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

SINKDLM_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
void axpy(double a, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace sinkdlm::row
