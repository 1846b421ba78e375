#include <cmath>
#include <cstring>
#include <limits>

#include "common/row_ops.h"
#include "common/target_clones.h"
#include "common/vector_cpu.h"

namespace sinkdlm::row {
using namespace vec;

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
