// Scalar math of the SEAL fused noise-contrastive kernel (host and device): the counter-based
// generator and the softplus / sigmoid pair of the global energy term.
#pragma once

#include "math.h"

namespace structloss_fast {
namespace seal {

// Philox4x32-10 (Salmon et al., SC'11), the generator of at::Philox4_32 (ATen/core/PhiloxRNGEngine.h)
// and of Triton's tl.randint4x. Written on plain integers, without branches, so that a loop over
// counters vectorizes (the 32 x 32 -> 64-bit products become vpmuludq in the AVX2 clone).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

SLF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{c0, c1, c2, c3};
}

// A label is on when (word >> 8) < p * 2^24: the 24-bit uniform (word >> 8) * 2^-24 compared
// with p, exactly, in float and double alike (every backend draws the same samples).
constexpr double kTwo24 = 16777216.0;

// softplus(h) as torch's Softplus(beta=1, threshold=20), and its derivative sigmoid(h)
// (1 above the threshold, as softplus_backward), branch-free from one e = exp(-|h|) in (0, 1]:
// log1p(e) = 2 atanh(s) with s = e / (2 + e) in (0, 1/3], the odd series to s^15 (truncation
// below 2.3e-8 relative, accurate for tiny e too) evaluated in Estrin's scheme (short dependency
// chains); one division serves s and 1 / (1 + e).
SLF_HD void softplus_sigmoid(float h, float& sp, float& sg) {
  const float a = h < 0.0f ? -h : h;
  const float e = exp_fast(-a);  // NaN stays NaN
  const float d1 = 1.0f + e, d2 = 2.0f + e;
  const float r = 1.0f / (d1 * d2);
  const float s = e * d1 * r;   // e / (2 + e)
  const float inv = d2 * r;     // 1 / (1 + e)
  const float t = s * s, t2 = t * t, t4 = t2 * t2;
  const float q01 = 1.0f + t * (1.0f / 3.0f);
  const float q23 = 1.0f / 5.0f + t * (1.0f / 7.0f);
  const float q45 = 1.0f / 9.0f + t * (1.0f / 11.0f);
  const float q67 = 1.0f / 13.0f + t * (1.0f / 15.0f);
  const float q = (q01 + t2 * q23) + t4 * (q45 + t2 * q67);
  const float pos = h > 0.0f ? h : 0.0f;
  sp = h > 20.0f ? h : pos + 2.0f * s * q;
  const float sig = h < 0.0f ? e * inv : inv;
  sg = h > 20.0f ? 1.0f : sig;
}

SLF_HD void softplus_sigmoid(double h, double& sp, double& sg) {
  const double a = h < 0.0 ? -h : h;
  const double e = exp(-a);
  const double inv = 1.0 / (1.0 + e);
  const double pos = h > 0.0 ? h : 0.0;
  sp = h > 20.0 ? h : pos + log1p(e);
  const double sig = h < 0.0 ? e * inv : inv;
  sg = h > 20.0 ? 1.0 : sig;
}

}  // namespace seal
}  // namespace structloss_fast
