// Row-wise helpers for the softmax inner loops of CPU kernels. The float versions are
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (SINKDLM_TARGET_CLONES), so one binary runs everywhere and still uses the wide vectors where
// they exist.
#pragma once

#include <cstdint>

namespace sinkdlm::row {

// max_i x[i] (-inf for n == 0).
float max(const float* x, int64_t n);
double max(const double* x, int64_t n);

// x[i] = exp(x[i] - m); returns the sum. exp(-inf) is exactly 0.
float exp_sub_sum(float* x, int64_t n, float m);
double exp_sub_sum(double* x, int64_t n, double m);

// sum_i exp(x[i] - m), x unchanged (x[i] <= m). With `weighted`, also
// *weighted = sum_i exp(x[i] - m) (x[i] - m), taking 0 for the terms whose exp underflows to 0
// (so -inf entries give 0, not nan): the entropy's sum.
float sum_exp(const float* x, int64_t n, float m, float* weighted = nullptr);

// x[i] = exp(x[i] - m), no sum (one row of the backward's P = exp(S - lse), m the row's lse).
void exp_sub(float* x, int64_t n, float m);
void exp_sub(double* x, int64_t n, double m);

// x[i] *= a.
void scale(float* x, int64_t n, float a);
void scale(double* x, int64_t n, double a);

// ds[i] = p[i] * (dp[i] - delta), written over dp.
void softmax_grad(const float* p, float* dp, int64_t n, float delta);
void softmax_grad(const double* p, double* dp, int64_t n, double delta);

// sum_i x[i] * y[i].
float dot(const float* x, const float* y, int64_t n);
double dot(const double* x, const double* y, int64_t n);

// y[i] += a * x[i].
void axpy(float a, const float* x, float* y, int64_t n);
void axpy(double a, const double* x, double* y, int64_t n);

}  // namespace sinkdlm::row
