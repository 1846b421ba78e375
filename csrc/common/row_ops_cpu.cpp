#include <cmath>
#include <cstring>
#include <limits>

#include "common/row_ops.h"
#include "common/target_clones.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // see SINKDLM_INLINE below

namespace sinkdlm::row {
namespace {

// 16 floats, written with GCC vector extensions rather than left to the auto-vectoriser
// (which gives up on the selects and reductions below): each target_clones variant lowers
// them to its own registers (1 zmm, 2 ymm or 4 xmm).
using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// Every helper taking or returning a vector is inlined into each clone: called out of line,
// clones compiled for different ISAs would disagree on how a 64-byte vector is passed.
#define SINKDLM_INLINE inline __attribute__((always_inline))

SINKDLM_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SINKDLM_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
SINKDLM_INLINE float hsum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
SINKDLM_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp for float: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial (relative
// error ~2e-7), 2^n through the exponent bits. Inputs below -87 (and -inf) give exactly 0.
// One template serves the vector loop body (V = vfloat) and its scalar tail (V = float).
template <typename V>
SINKDLM_INLINE V exp_poly(V r) {
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

SINKDLM_INLINE vfloat fast_exp(vfloat x) {
  const vfloat lo = vfloat{} - 87.0f, hi = vfloat{} + 88.5f;
  const vfloat xc = x < lo ? lo : (x > hi ? hi : x);
  // Round to nearest by the 1.5 * 2^23 trick (no vector floor in the extensions).
  const vfloat n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vfloat r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat y = exp_poly(r) * reinterpret_cast<const vfloat&>(bits);
  return x < lo ? vfloat{} : y;
}

inline float fast_exp(float x) {
  if (!(x >= -87.0f)) return x != x ? x : 0.0f;  // NaN stays NaN
  const float xc = x > 88.5f ? 88.5f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return exp_poly(r) * scale;
}

}  // namespace

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) float max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kLanes) {
    vfloat vm = vload(x);
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const vfloat v = vload(x + i);
      vm = v > vm ? v : vm;
    }
    m = hmax(vm);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
double max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) float exp_sub_sum(float* x, int64_t n, float m) {
  vfloat vs{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat e = fast_exp(vload(x + i) - m);
    vstore(x + i, e);
    vs += e;
  }
  float s = hsum(vs);
  for (; i < n; ++i) {
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

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA)
float sum_exp(const float* x, int64_t n, float m, float* weighted) {
  const vfloat lo = vfloat{} - 87.0f;
  vfloat vs{}, vw{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat d = vload(x + i) - m;
    const vfloat e = fast_exp(d);
    vs += e;
    if (weighted) vw += d < lo ? vfloat{} : e * d;
  }
  float s = hsum(vs), w = hsum(vw);
  for (; i < n; ++i) {
    const float d = x[i] - m;
    const float e = fast_exp(d);
    s += e;
    if (weighted) w += d < -87.0f ? 0.0f : e * d;
  }
  if (weighted) *weighted = w;
  return s;
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) void exp_sub(float* x, int64_t n, float m) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, fast_exp(vload(x + i) - m));
  for (; i < n; ++i) x[i] = fast_exp(x[i] - m);
}
void exp_sub(double* x, int64_t n, double m) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - m);
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) void scale(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
void scale(double* x, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA)
void softmax_grad(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}
void softmax_grad(const double* p, double* dp, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) float dot(const float* x, const float* y, int64_t n) {
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

SINKDLM_TARGET_CLONES(SINKDLM_ISAS_FMA) void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
void axpy(double a, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace sinkdlm::row
