// The per-element and per-row math of the row-softmax family (Encouraging Loss, margin heads),
// shared by the CPU kernels and any device port (SLF_HD).
//
// One row: raw values r_j (logits, or cosines for the margin heads), a transform that turns
// them into logits z_j (identity, NormFace, CosFace, ArcFace, class-level Circle; the target
// class y has its own formula), the log-sum-exp L, p_j = exp(z_j - L), q_j = 1 - p_j, and
//     f_j = -log p_j + rho * b(p_j)                      (the Encouraging Loss of class j)
//     row loss = (1 - ls) w_y f_y + (ls / C) sum_j w_j f_j
// with the bonus b of docs/spec/softmax.md (eps clamp, conservative tangent above LE).
// Its gradient is dl/dz_i = p_i S - c_i h_i, with h_k = 1 - rho p_k b'(p_k),
// c_k = (1 - ls) w_y [k == y] + (ls / C) w_k and S = sum_k c_k h_k.
//
// Accuracy: q of the target (and of the single non-target class that may hold p > 1/2) is
// taken from the sum of the *other* exponentials, q_y = sum_{k != y} e_k / sum_k e_k, which
// has no cancellation (the spec's -expm1(z_y - L) is the same number in exact arithmetic, but
// in float32 z_y - L already carries an absolute error of ulp(L)). The target gradient is
// formed as -c_y (h_y q_y) with h_y q_y = q_y + rho p_y below LE, so that a confident row
// keeps its exact target gradient (-1 at rho = 1, LE = 1) instead of p_y - 1 = 0.
#pragma once

#include "ids.h"
#include "math.h"

namespace structloss_fast {

template <typename T>
SLF_HD T clamp_unit(T c) {
  // NaN stays NaN (the comparisons are false).
  return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
}

template <typename T>
SLF_HD T sqrt_(T x) {
  return sqrt(x);
}

// The logit transform of one row element; `other` is branch-free so the row loops vectorize.
template <typename T>
struct Transform {
  int64_t kind;
  T t0, t1;          // scale / gamma, margin
  T cos_m, sin_m;    // ArcFace
  T arc_th, arc_mm;  // cos(pi - m), m sin m
  Transform(int64_t kind_, T t0_, T t1_) : kind(kind_), t0(t0_), t1(t1_) {
    cos_m = static_cast<T>(std::cos(static_cast<double>(t1_)));
    sin_m = static_cast<T>(std::sin(static_cast<double>(t1_)));
    arc_th = static_cast<T>(std::cos(M_PI - static_cast<double>(t1_)));
    arc_mm = static_cast<T>(static_cast<double>(t1_) * std::sin(static_cast<double>(t1_)));
  }
  // Non-target classes, with the transform known at compile time so the row loops
  // vectorize: s r for the scaled heads, Circle's negative logit for Circle.
  template <int64_t K>
  SLF_HD T other(T r) const {
    if constexpr (K == kIdentity) {
      return r;
    } else if constexpr (K == kCircleClass) {
      return t0 * relu(r + t1) * (r - t1);
    } else {
      return t0 * r;
    }
  }
  template <int64_t K>
  SLF_HD T other_grad(T r) const {
    if constexpr (K == kIdentity) {
      return T(1);
    } else if constexpr (K == kCircleClass) {
      return t0 * relu(r + t1);  // alpha detached
    } else {
      return t0;
    }
  }
  T target(T r) const {
    switch (kind) {
      case kIdentity: return r;
      case kNormFace: return t0 * r;
      case kCosFace: return t0 * (r - t1);
      case kArcFace: {
        const T c = clamp_unit(r);
        if (c >= arc_th) {
          const T sine = std::sqrt(std::max(T(1) - c * c, T(0)));
          return t0 * (c * cos_m - sine * sin_m);
        }
        return t0 * (c - arc_mm);
      }
      default: return t0 * relu(T(1) + t1 - r) * (r - (T(1) - t1));
    }
  }
  T target_grad(T r) const {
    switch (kind) {
      case kIdentity: return T(1);
      case kNormFace:
      case kCosFace: return t0;
      case kArcFace: {
        if (r > T(1) || r < T(-1)) return T(0);  // clamped (as acos(clamp(r, -1, 1)))
        if (r >= arc_th) {
          const T sine = std::sqrt(std::max(T(1) - r * r, T(0)));
          return t0 * (cos_m + sin_m * r / sine);  // d/dr cos(acos(r) + m)
        }
        return t0;
      }
      default: return t0 * relu(T(1) + t1 - r);  // alpha detached
    }
  }
};

// Encouraging Loss parameters, with the derived constants the row loops use.
template <typename T>
struct ElParams {
  T log_end, rho, ls, eps;
  T log_eps, log1m_le, inv_1m_le;
  bool has_le;  // log_end < 1: the conservative branch exists
  ElParams(double log_end_, double rho_, double ls_, double eps_)
      : log_end(static_cast<T>(log_end_)), rho(static_cast<T>(rho_)), ls(static_cast<T>(ls_)), eps(static_cast<T>(eps_)) {
    has_le = log_end_ < 1.0;
    log_eps = static_cast<T>(std::log(eps_));
    log1m_le = has_le ? static_cast<T>(std::log1p(-log_end_)) : T(0);
    inv_1m_le = has_le ? static_cast<T>(1.0 / (1.0 - log_end_)) : T(0);
  }
};

// Bonus of one class from an accurate (p, q = 1 - p) and log(q) where it is needed (scalar use:
// the target and the largest non-target class). b: the bonus; h = 1 - rho p b'(p); hq = h q.
template <typename T>
struct Bonus {
  T b, h, hq;
};

template <typename T>
inline Bonus<T> bonus_of(T p, T q, const ElParams<T>& el) {
  Bonus<T> r;
  if (el.has_le && p > el.log_end) {
    r.b = el.log1m_le - (p - el.log_end) * el.inv_1m_le;
    r.h = T(1) + el.rho * p * el.inv_1m_le;
    r.hq = q * r.h;
  } else if (q >= el.eps) {
    r.b = std::log(q);
    r.h = T(1) + el.rho * p / q;
    r.hq = q + el.rho * p;
  } else {
    // eps clamp active: constant bonus, no gradient through it (torch.clamp's rule).
    r.b = el.log_eps;
    r.h = T(1);
    r.hq = q;
  }
  return r;
}


// log(1 - p) for p in [0, 1/2] without losing small p: u = 1 - p is exact to half an ulp and
// log1p(-p) = log(u) - ((u - 1) + p) / u corrects for its rounding.
SLF_HD float log1p_neg_fast(float p) {
  const float u = 1.0f - p;
  return log_fast(u) - ((u - 1.0f) + p) / u;
}

SLF_HD double log1p_neg_fast(double p) { return log1p(-p); }

}  // namespace structloss_fast
