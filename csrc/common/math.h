// Scalar math shared by the CPU and CUDA kernels (host and device).
//
// Everything here is written branch-free where it sits in a hot loop, so that GCC's
// auto-vectorizer turns the CPU loops into AVX2 code inside the multiversioned functions
// (see SLF_CPU_MULTIVERSION) and nvcc compiles the same text for the GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLF_HD __host__ __device__ __forceinline__
#define SLF_ON_DEVICE 1
#else
#define SLF_HD inline __attribute__((always_inline))
#define SLF_ON_DEVICE 0
#endif

// Function multiversioning for the CPU hot loops: one AVX2+FMA clone (x86-64-v3) and a
// baseline clone, chosen at load time by the dynamic loader. The extension itself is built
// for baseline x86-64, so the package still loads on any x86-64 machine.
#if !SLF_ON_DEVICE && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__linux__) && !defined(SLF_NO_MULTIVERSION)
#define SLF_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SLF_CPU_MULTIVERSION
#endif

namespace structloss_fast {

// Overloads that pick the float or double C function on host and device alike.
SLF_HD float exp_(float x) { return expf(x); }
SLF_HD double exp_(double x) { return exp(x); }
SLF_HD float log_(float x) { return logf(x); }
SLF_HD double log_(double x) { return log(x); }
SLF_HD float log1p_(float x) { return log1pf(x); }
SLF_HD double log1p_(double x) { return log1p(x); }
SLF_HD float sqrt_(float x) { return sqrtf(x); }
SLF_HD double sqrt_(double x) { return sqrt(x); }

template <typename T>
SLF_HD T relu(T x) {
  // NaN stays NaN (a NaN embedding must give a non-finite loss).
  return x < T(0) ? T(0) : x;
}

template <typename T>
SLF_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// torch.nn.Softplus(beta=1, threshold=20): x above the threshold is returned as is.
template <typename T>
SLF_HD T softplus(T x) {
  return x > T(20) ? x : log1p_(exp_(x));
}

// Derivative of the softplus above, as torch's softplus_backward computes it.
template <typename T>
SLF_HD T softplus_grad(T x) {
  if (x > T(20)) return T(1);
  T e = exp_(x);
  return e / (e + T(1));
}

// log(1 + exp(x)) without a threshold (a log-sum-exp with an added zero); 0 at -inf.
template <typename T>
SLF_HD T softplus_exact(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1p_(exp_(-ax));
}

template <typename T>
SLF_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp_(-x));
  const T e = exp_(x);
  return e / (T(1) + e);
}

// exp(x) for float, branch-free so that a loop calling it vectorizes. Cody-Waite range
// reduction x = k ln2 + r, |r| <= ln2/2, and a degree-6 minimax polynomial for exp(r)
// (relative error about 1 ulp). Results below FLT_MIN are flushed to 0: every use in this
// package is a softmax weight exp(a - max) or exp(a - lse), where such values are
// negligible against the largest term (which is 1).
SLF_HD float exp_fast(float x) {
  const float kHi = 88.3762626647949f;
  const float kLo = -87.3300018310547f;
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  float k = floorf(xc * kLog2e + 0.5f);
  float r = xc - k * kLn2Hi;
  r = r - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
#if defined(__CUDA_ARCH__)
  float scale = __int_as_float(bits);
#else
  const float scale = __builtin_bit_cast(float, bits);  // a memcpy here blocks the vectorizer
#endif
  float y = p * scale;
  y = x > kHi ? static_cast<float>(INFINITY) : y;
  y = x < kLo ? 0.0f : y;
  y = x != x ? x : y;
  return y;
}

SLF_HD double exp_fast(double x) { return exp(x); }

// log(x) for float on [FLT_MIN, inf), branch-free (Cephes logf: frexp-style reduction to
// [sqrt(1/2), sqrt(2)) and a degree-8 polynomial, about 1 ulp). NaN stays NaN. Used on
// arguments in (0, 1] by the softmax rows and the SGLD noise; 0 and negatives are not handled.
SLF_HD float log_fast(float x) {
  int32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_int(x);
#else
  bits = __builtin_bit_cast(int32_t, x);
#endif
  int32_t e = ((bits >> 23) & 0xff) - 126;
  int32_t mbits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
#if defined(__CUDA_ARCH__)
  m = __int_as_float(mbits);
#else
  m = __builtin_bit_cast(float, mbits);
#endif
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  float r = m + y + 0.693359375f * fe;
  return x != x ? x : r;
}

SLF_HD double log_fast(double x) { return log(x); }

// The arithmetic type of an elementwise kernel on T: float for float, half and bfloat16
// (reduced types are computed in float), double for double.
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

}  // namespace structloss_fast
