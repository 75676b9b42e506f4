// The math of the fused SGLD step, shared by the CPU and CUDA kernels (host and device).
//
// One step, in place, for every element i (grad is the gradient of the log-density,
// i.e. -dE/dx; the Python layer turns the JEM and Langevin forms into the two coefficients):
//     inc = step_coef * clamp(g, g_lo, g_hi)            (gradient clamp optional)
//     inc = inc + noise_coef * eps                       (unless noise_after_clamp)
//     y   = clamp(x + inc, x_lo, x_hi)                   (x clamp optional)
//     y   = y + noise_coef * eps                         (if noise_after_clamp)
// Each product and sum is rounded once, in this order: the order of the authors'
// `x.data += a * g + b * torch.randn_like(x)`, which the reference (structloss_fast/reference/
// sgld.py) spells out. No FMA contraction (see csrc/cpu/sgld.cpp and __fmul_rn/__fadd_rn
// below), so float32/float64 results equal the reference's to the bit given the same noise.
// float16/bfloat16 are computed in float32 and rounded once.
//
// Noise: counter-based Philox4x32-10 (Salmon et al., SC'11; the engine of cuRAND and of
// ATen's PhiloxRNGEngine.h), key = 64-bit seed, counter = (ctr_lo, ctr_hi, block_lo, block_hi)
// with a per-call 64-bit counter base and the block index. Elements are mapped to Philox
// outputs tile by tile: a tile is W = kTileBlocks consecutive blocks, and normal k of block
// t*W + j is element t*(W*P) + k*W + j, so that a vector of blocks fills consecutive elements.
// float: P = 4, normals (0, 1) from words (0, 1) and (2, 3) from words (2, 3) by Box-Muller
// (cos, sin), 24-bit uniforms; double: P = 2, words (0, 1) and (2, 3) make two 53-bit
// uniforms for one Box-Muller pair.
// The result is a pure function of (seed, counter base, element index): independent of the
// thread count, the vector width and the device's launch configuration.
#pragma once

#include <cstdint>

#include "math.h"

namespace structloss_fast {
namespace sgld {

// Philox blocks per tile (W above). Part of the noise definition: changing it changes the
// stream that a seed produces.
constexpr int64_t kTileBlocks = 128;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Philox4x32 with 10 rounds, in place on the counter words c0..c3.
SLF_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// ---- float: 24-bit uniforms, branch-free log / sin / cos (Cephes-style minimax polynomials,
// about 1 ulp), so that the CPU loops vectorize. Only finite, positive, normal arguments occur.

SLF_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

SLF_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// Natural log of u in [2^-24, 1] (math.h's log_fast: Cephes reduction and polynomial).
SLF_HD float log_unit(float u) { return log_fast(u); }

// (cos, sin) of 2*pi*v for v in [0, 1): quarter turns taken exactly, the rest by polynomials
// on [-pi/4, pi/4].
SLF_HD void sincos_2pi(float v, float& c_out, float& s_out) {
  const float q = v * 4.0f;                     // exact
  const float k = floorf(q + 0.5f);             // nearest quarter turn, 0..4
  const float a = (q - k) * 1.57079632679489662f;  // q - k exact, in [-0.5, 0.5]
  const float z = a * a;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = (s * z) * a + a;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = (c * z) * z - 0.5f * z + 1.0f;
  // rotate (c, s) by k quarter turns: odd k swaps them, and the signs follow the quadrant
  const int32_t quadrant = static_cast<int32_t>(k);
  const bool swap = (quadrant & 1) != 0;
  const float cc = swap ? s : c;
  const float ss = swap ? c : s;
  const float c1 = bits_to_float(float_to_bits(cc) ^ (static_cast<uint32_t>((quadrant + 1) & 2) << 30));
  const float s1 = bits_to_float(float_to_bits(ss) ^ (static_cast<uint32_t>(quadrant & 2) << 30));
  c_out = c1;
  s_out = s1;
}

// Two standard normals from two 32-bit words (Box-Muller): radius from u in (0, 1], angle
// from v in [0, 1), each with 24 random bits.
SLF_HD void box_muller(uint32_t w_radius, uint32_t w_angle, float& n_cos, float& n_sin) {
  const float u = static_cast<float>(static_cast<int32_t>(w_radius >> 8) + 1) * 5.9604644775390625e-8f;
  const float v = static_cast<float>(static_cast<int32_t>(w_angle >> 8)) * 5.9604644775390625e-8f;
  const float r = sqrtf(-2.0f * log_unit(u));
  float c, s;
  sincos_2pi(v, c, s);
  n_cos = r * c;
  n_sin = r * s;
}

// ---- double: 53-bit uniforms from two words each, libm (accuracy first; double is not a
// speed target).
SLF_HD void box_muller(uint32_t r_lo, uint32_t r_hi, uint32_t a_lo, uint32_t a_hi, double& n_cos, double& n_sin) {
  const uint64_t wr = (static_cast<uint64_t>(r_hi) << 32) | r_lo;
  const uint64_t wa = (static_cast<uint64_t>(a_hi) << 32) | a_lo;
  const double u = static_cast<double>((wr >> 11) + 1) * 1.1102230246251565e-16;  // (0, 1]
  const double v = static_cast<double>(wa >> 11) * 1.1102230246251565e-16;        // [0, 1)
  const double r = sqrt(-2.0 * log(u));
#if defined(__CUDA_ARCH__)
  double s, c;
  sincospi(2.0 * v, &s, &c);
#else
  const double c = cos(6.283185307179586476925 * v), s = sin(6.283185307179586476925 * v);
#endif
  n_cos = r * c;
  n_sin = r * s;
}

// ---- the update

// Correctly rounded product and sum: on the device nvcc would otherwise contract a*b+c into
// an FMA; the CPU translation unit disables contraction for the same reason.
SLF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SLF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SLF_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SLF_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// torch.clamp semantics: NaN passes through.
template <typename T>
SLF_HD T clamp_nan(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Step coefficients and clamps, in the compute type T (float for float16/bfloat16/float32).
template <typename T>
struct StepCoefs {
  T step, noise;
  T g_lo, g_hi, x_lo, x_hi;
  bool clamp_grad, clamp_x, noise_after_clamp;
};

// Host-side construction from the op's arguments (clamps: empty, or {lo, hi}). Bounds and
// coefficients are rounded to T as torch rounds a Python scalar for a tensor of that dtype.
template <typename T>
inline StepCoefs<T> make_step_coefs(double step, double noise, const double* g_clamp, const double* x_clamp,
                                    bool noise_after_clamp) {
  StepCoefs<T> c;
  c.step = static_cast<T>(step);
  c.noise = static_cast<T>(noise);
  c.clamp_grad = g_clamp != nullptr;
  c.g_lo = g_clamp ? static_cast<T>(g_clamp[0]) : T(0);
  c.g_hi = g_clamp ? static_cast<T>(g_clamp[1]) : T(0);
  c.clamp_x = x_clamp != nullptr;
  c.x_lo = x_clamp ? static_cast<T>(x_clamp[0]) : T(0);
  c.x_hi = x_clamp ? static_cast<T>(x_clamp[1]) : T(0);
  c.noise_after_clamp = noise_after_clamp;
  return c;
}

// One element. `with_noise` is false when no noise is added at all (noise_coef 0 and no
// noise tensor); the branches below are uniform across a loop, so they do not stop
// vectorization (the compiler hoists them, and they cost nothing per element on the GPU).
template <typename T>
SLF_HD T sgld_update(T x, T g, T eps, const StepCoefs<T>& c, bool with_noise) {
  const T gc = c.clamp_grad ? clamp_nan(g, c.g_lo, c.g_hi) : g;
  const T noise_term = mul_rn(c.noise, eps);
  T inc = mul_rn(c.step, gc);
  if (with_noise && !c.noise_after_clamp) inc = add_rn(inc, noise_term);
  T y = add_rn(x, inc);
  if (c.clamp_x) y = clamp_nan(y, c.x_lo, c.x_hi);
  if (with_noise && c.noise_after_clamp) y = add_rn(y, noise_term);
  return y;
}

}  // namespace sgld
}  // namespace structloss_fast
