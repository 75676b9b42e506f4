// CPU kernels of the row-softmax family: Encouraging Loss (and cross-entropy as its rho = 0
// case) on logits or on margin-head cosines, and the fused linear variant that never holds
// the N x C logits.
//
// One row is read once for its statistics (max, sum of exponentials, kept online in blocks of
// kBlock elements that stay in L1), once more for the label-smoothing sums when ls > 0, and
// once to write the gradient, which the forward does whenever a backward will follow: the
// backward then only scales it. All loops are branch-free and written to auto-vectorize
// inside the AVX2 clone of the multiversioned row functions (SLF_CPU_MULTIVERSION).
// The math and its accuracy argument are in csrc/common/softmax_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/softmax_math.h"

namespace structloss_fast {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 1024;  // elements of one online-softmax block (4 KiB of float)


// Running statistics of the non-target logits of a row: max m, sum of exp(z - m) over the
// elements below m, and how many equal m (kept apart so that the largest class's 1 - p can be
// formed without cancellation).
template <typename T>
struct OtherStats {
  T m = neg_inf<T>();
  T s_below = T(0);
  int64_t n_at_max = 0;
};

template <typename T>
struct RowState {
  bool ignored = true;
  int64_t y = 0;
  T raw_y = T(0), z_y = T(0), wy = T(0);
  T L = T(0), m_o = T(0), mx = T(0), log_s = T(0);
  int64_t n_o = 0;
  T p_y = T(0), q_y = T(0), p_hi = T(0), q_hi = T(0);
  Bonus<T> by{T(0), T(0), T(0)};
  T f_y = T(0);
  T a_rest = T(0), f_rest = T(0), w_hi = T(0);  // label-smoothing sums (non-target, non-largest)
  T S = T(0), g_y = T(0), g_hi = T(0), loss = T(0);
  OtherStats<T> st;
};

// ---------------------------------------------------------------- row phases

// Phase 1 over a segment of a row: online max / sum-exp of the non-target logits. y_local is
// the target's index inside the segment (outside [0, len) when the segment lacks it).
template <int64_t K, typename In, typename T>
SLF_HD void phase1_segment(const In* raw, int64_t len, int64_t y_local, const Transform<T>& tr, OtherStats<T>& st,
                           T* zbuf) {
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, len - b0);
    const int64_t yl = y_local - b0;
    const In* rb = raw + b0;
    T bmax = neg_inf<T>();
#pragma omp simd reduction(max : bmax)
    for (int64_t j = 0; j < n; ++j) {
      T z = tr.template other<K>(static_cast<T>(rb[j]));
      z = (j == yl) ? neg_inf<T>() : z;
      zbuf[j] = z;
      bmax = z > bmax ? z : bmax;
    }
    if (bmax > st.m) {
      const T scale = exp_(st.m - bmax);
      st.s_below = (st.s_below + static_cast<T>(st.n_at_max)) * scale;
      st.n_at_max = 0;
      st.m = bmax;
    }
    const T m = st.m;
    const T shift = (m == neg_inf<T>()) ? T(0) : m;
    T s = T(0);
    int64_t cnt = 0;
    // A NaN logit is never "at the max" and so reaches the sum (and the loss) as NaN.
#pragma omp simd reduction(+ : s, cnt)
    for (int64_t j = 0; j < n; ++j) {
      const T z = zbuf[j];
      const bool at = (z == m) && (j != yl);
      const T e = exp_fast(z - shift);
      s += at ? T(0) : e;
      cnt += at ? 1 : 0;
    }
    st.s_below += s;
    st.n_at_max += cnt;
  }
}

// After phase 1: merge the target logit, form L, p_y, q_y (and p, q of the largest
// non-target class) without cancellation, and the target's bonus.
template <typename T>
void finalize_stats(RowState<T>& r, const Transform<T>& tr, const ElParams<T>& el) {
  const OtherStats<T>& st = r.st;
  r.m_o = st.m;
  r.n_o = st.n_at_max;
  r.z_y = tr.target(r.raw_y);
  const T m = r.z_y > st.m ? r.z_y : st.m;
  const T scale_o = exp_(st.m - m);  // NaN for an all -inf row: its loss is NaN, as torch's
  const T e_o = (st.s_below + static_cast<T>(st.n_at_max)) * scale_o;
  const T e_y = exp_(r.z_y - m);
  const T s_all = e_o + e_y;
  r.mx = m;
  r.log_s = log_(s_all);
  r.L = m + r.log_s;
  r.p_y = e_y / s_all;
  r.q_y = e_o / s_all;
  if (st.n_at_max == 1) {
    r.p_hi = scale_o / s_all;
    r.q_hi = (st.s_below * scale_o + e_y) / s_all;
  }
  r.by = bonus_of(r.p_y, r.q_y, el);
  r.f_y = ((m - r.z_y) + r.log_s) + el.rho * r.by.b;
}

// Phase 2 (label smoothing only) over a segment: sums over the non-target classes other than
// the largest one of w h and w f, and the largest one's weight.
template <int64_t K, typename In, typename T>
SLF_HD void phase2_segment(const In* raw, const T* cw, int64_t len, int64_t y_local, const Transform<T>& tr,
                           const ElParams<T>& el, RowState<T>& r) {
  const T mx = r.mx, log_s = r.log_s, m_o = r.m_o;
  const bool has_hi = r.n_o == 1;
  const bool has_le = el.has_le;
  const T log_end = el.log_end, log1m_le = el.log1m_le, inv_1m_le = el.inv_1m_le, rho = el.rho, eps = el.eps,
          log_eps = el.log_eps;
  T a = T(0), f = T(0), whi = T(0);
#pragma omp simd reduction(+ : a, f, whi)
  for (int64_t j = 0; j < len; ++j) {
    const T z = tr.template other<K>(static_cast<T>(raw[j]));
    const T d = (z - mx) - log_s;  // log p
    const T p = exp_fast(d);
    const T q = T(1) - p;
    const bool cons = has_le && p > log_end;
    const bool clamped = !(q >= eps);
    const T b = cons ? log1m_le - (p - log_end) * inv_1m_le : (clamped ? log_eps : log1p_neg_fast(p));
    const T h = cons ? T(1) + rho * p * inv_1m_le : (clamped ? T(1) : T(1) + rho * p / q);
    const T w = cw[j];
    const T fj = rho * b - d;
    const bool skip = j == y_local;
    const bool hi = has_hi && (z == m_o) && !skip;
    a += (skip || hi) ? T(0) : w * h;
    f += (skip || hi) ? T(0) : w * fj;
    whi += hi ? w : T(0);
  }
  r.a_rest += a;
  r.f_rest += f;
  r.w_hi += whi;
}

// After phase 2 (or directly after phase 1 when ls = 0): S, the target gradient, the largest
// non-target class's gradient (ls > 0) and the row loss, all unscaled.
template <typename T>
void finalize_grad(RowState<T>& r, const ElParams<T>& el, int64_t C) {
  const T wy = r.wy;
  if (!(el.ls > T(0))) {
    r.S = wy * r.by.h;
    r.g_y = -wy * r.by.hq;
    r.g_hi = T(0);
    r.loss = wy * r.f_y;
    return;
  }
  const T ls = el.ls, lsC = el.ls / static_cast<T>(C);
  const bool has_hi = r.n_o == 1;
  Bonus<T> hi{T(0), T(0), T(0)};
  T f_hi = T(0);
  if (has_hi) {
    hi = bonus_of(r.p_hi, r.q_hi, el);
    f_hi = ((r.mx - r.m_o) + r.log_s) + el.rho * hi.b;
  }
  const T why = wy * r.by.h;
  const T sum_wh = r.a_rest + (has_hi ? r.w_hi * hi.h : T(0));
  r.S = (T(1) - ls) * why + lsC * (why + sum_wh);
  r.g_y = -((T(1) - ls) + lsC) * wy * r.by.hq + r.p_y * lsC * sum_wh;
  r.g_hi = has_hi ? r.p_hi * ((T(1) - ls) * why + lsC * (why + r.a_rest)) - lsC * r.w_hi * hi.hq : T(0);
  r.loss = (T(1) - ls) * wy * r.f_y + lsC * (wy * r.f_y + r.f_rest + (has_hi ? r.w_hi * f_hi : T(0)));
}

// Phase 3 over a segment: writes scale * dl/dr (in place when out aliases raw).
template <int64_t K, bool LS, typename In, typename T, typename Out>
SLF_HD void phase3_segment(const In* raw, Out* out, const T* cw, int64_t len, int64_t y_local, const Transform<T>& tr,
                           const ElParams<T>& el, const RowState<T>& r, T scale, int64_t C) {
  const T mx = r.mx, log_s = r.log_s, S = r.S, m_o = r.m_o, g_hi = r.g_hi;
  const bool has_hi = r.n_o == 1;
  const bool has_le = el.has_le;
  const T log_end = el.log_end, inv_1m_le = el.inv_1m_le, rho = el.rho, eps = el.eps;
  const T lsC = el.ls / static_cast<T>(C);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const T rj = static_cast<T>(raw[j]);
    const T z = tr.template other<K>(rj);
    const T p = exp_fast((z - mx) - log_s);
    T g;
    if constexpr (LS) {
      const T q = T(1) - p;
      const bool cons = has_le && p > log_end;
      const bool clamped = !(q >= eps);
      const T h = cons ? T(1) + rho * p * inv_1m_le : (clamped ? T(1) : T(1) + rho * p / q);
      const bool hi = has_hi && (z == m_o);
      g = hi ? g_hi : p * S - lsC * cw[j] * h;
    } else {
      g = p * S;
    }
    if constexpr (K != kIdentity) g *= tr.template other_grad<K>(rj);
    out[j] = static_cast<Out>(g * scale);
  }
  if (y_local >= 0 && y_local < len) {
    out[y_local] = static_cast<Out>(r.g_y * tr.target_grad(r.raw_y) * scale);
  }
}

template <typename T>
void store_stats(const RowState<T>& r, T* s) {
  s[kSmLse] = r.L;
  s[kSmRowLoss] = r.loss;
  s[kSmS] = r.S;
  s[kSmGradY] = r.g_y;
  s[kSmGradHi] = r.g_hi;
  s[kSmMaxOther] = r.m_o;
  s[kSmCountMax] = static_cast<T>(r.n_o);
  s[kSmMax] = r.mx;
  s[kSmLogSum] = r.log_s;
}

template <typename T>
void load_stats(RowState<T>& r, const T* s) {
  r.L = s[kSmLse];
  r.loss = s[kSmRowLoss];
  r.S = s[kSmS];
  r.g_y = s[kSmGradY];
  r.g_hi = s[kSmGradHi];
  r.m_o = s[kSmMaxOther];
  r.n_o = static_cast<int64_t>(s[kSmCountMax]);
  r.mx = s[kSmMax];
  r.log_s = s[kSmLogSum];
}

template <typename T>
void ignored_stats(T* s) {
  for (int64_t k = 0; k < kNumSoftmaxStats; ++k) s[k] = T(0);
}

// ---------------------------------------------------------------- whole rows

template <typename In, typename T, typename Out>
struct RowsArgs {
  const In* raw;        // rows x C (row stride ld_raw)
  Out* out;             // rows x C gradient (row stride ld_out), or nullptr
  int64_t ld_raw, ld_out;
  int64_t C;
  const int64_t* target;  // per row (already offset to the first row)
  int64_t ignore_index;
  const T* cw;          // (C,) class weights (ones when none were given)
  T* stats;             // per row kNumSoftmaxStats (offset to the first row)
  const T* row_scale;   // per row scale of the gradient (backward), or nullptr
  T scale;              // gradient scale when row_scale is null
  const Transform<T>* tr;
  const ElParams<T>* el;
};

// Forward of rows [b, e): statistics, row loss and (with out) the scaled gradient.
template <int64_t K, typename In, typename T, typename Out>
SLF_CPU_MULTIVERSION void forward_rows(const RowsArgs<In, T, Out>& a, int64_t b, int64_t e) {
  T zbuf[kBlock];
  const bool ls = a.el->ls > T(0);
  for (int64_t i = b; i < e; ++i) {
    const In* raw = a.raw + i * a.ld_raw;
    Out* out = a.out ? a.out + i * a.ld_out : nullptr;
    T* stats = a.stats + i * kNumSoftmaxStats;
    const int64_t y = a.target[i];
    if (y == a.ignore_index) {
      ignored_stats(stats);
      if (out) std::fill(out, out + a.C, static_cast<Out>(0));
      continue;
    }
    RowState<T> r;
    r.ignored = false;
    r.y = y;
    r.raw_y = static_cast<T>(raw[y]);
    r.wy = a.cw[y];
    phase1_segment<K>(raw, a.C, y, *a.tr, r.st, zbuf);
    finalize_stats(r, *a.tr, *a.el);
    if (ls) phase2_segment<K>(raw, a.cw, a.C, y, *a.tr, *a.el, r);
    finalize_grad(r, *a.el, a.C);
    store_stats(r, stats);
    if (out) {
      const T scale = a.row_scale ? a.row_scale[i] : a.scale;
      if (ls) {
        phase3_segment<K, true>(raw, out, a.cw, a.C, y, *a.tr, *a.el, r, scale, a.C);
      } else {
        phase3_segment<K, false>(raw, out, a.cw, a.C, y, *a.tr, *a.el, r, scale, a.C);
      }
    }
  }
}

// Backward of rows [b, e) from the saved statistics: out = row_scale * dl/dr.
template <int64_t K, typename In, typename T, typename Out>
SLF_CPU_MULTIVERSION void backward_rows(const RowsArgs<In, T, Out>& a, int64_t b, int64_t e) {
  const bool ls = a.el->ls > T(0);
  for (int64_t i = b; i < e; ++i) {
    const In* raw = a.raw + i * a.ld_raw;
    Out* out = a.out + i * a.ld_out;
    const int64_t y = a.target[i];
    if (y == a.ignore_index) {
      std::fill(out, out + a.C, static_cast<Out>(0));
      continue;
    }
    RowState<T> r;
    load_stats(r, a.stats + i * kNumSoftmaxStats);
    r.raw_y = static_cast<T>(raw[y]);
    const T scale = a.row_scale ? a.row_scale[i] : a.scale;
    if (ls) {
      phase3_segment<K, true>(raw, out, a.cw, a.C, y, *a.tr, *a.el, r, scale, a.C);
    } else {
      phase3_segment<K, false>(raw, out, a.cw, a.C, y, *a.tr, *a.el, r, scale, a.C);
    }
  }
}

// Segment-wise versions for class tiles (fused linear with very large C): one call per row
// range and tile; the per-row state lives in `states` across tiles.
template <int64_t K, typename T>
SLF_CPU_MULTIVERSION void tile_phase1_rows(const T* tile, int64_t ld, int64_t c0, int64_t ct, RowState<T>* states,
                                           const Transform<T>& tr, int64_t b, int64_t e) {
  T zbuf[kBlock];
  for (int64_t i = b; i < e; ++i) {
    RowState<T>& r = states[i];
    if (r.ignored) continue;
    const T* raw = tile + i * ld;
    const int64_t yl = r.y - c0;
    if (yl >= 0 && yl < ct) r.raw_y = raw[yl];
    phase1_segment<K>(raw, ct, yl, tr, r.st, zbuf);
  }
}

template <int64_t K, typename T>
SLF_CPU_MULTIVERSION void tile_phase2_rows(const T* tile, int64_t ld, int64_t c0, int64_t ct, const T* cw,
                                           RowState<T>* states, const Transform<T>& tr, const ElParams<T>& el,
                                           int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    RowState<T>& r = states[i];
    if (r.ignored) continue;
    phase2_segment<K>(tile + i * ld, cw + c0, ct, r.y - c0, tr, el, r);
  }
}

template <int64_t K, typename T>
SLF_CPU_MULTIVERSION void tile_phase3_rows(T* tile, int64_t ld, int64_t c0, int64_t ct, const T* cw,
                                           const RowState<T>* states, const T* row_scale, const Transform<T>& tr,
                                           const ElParams<T>& el, int64_t C, int64_t b, int64_t e) {
  const bool ls = el.ls > T(0);
  for (int64_t i = b; i < e; ++i) {
    const RowState<T>& r = states[i];
    T* row = tile + i * ld;
    if (r.ignored) {
      std::fill(row, row + ct, T(0));
      continue;
    }
    if (ls) {
      phase3_segment<K, true>(row, row, cw + c0, ct, r.y - c0, tr, el, r, row_scale[i], C);
    } else {
      phase3_segment<K, false>(row, row, cw + c0, ct, r.y - c0, tr, el, r, row_scale[i], C);
    }
  }
}

// ---------------------------------------------------------------- dispatch helpers

template <typename Fn>
void with_transform(int64_t kind, Fn&& fn) {
  switch (kind) {
    case kIdentity: fn(std::integral_constant<int64_t, kIdentity>{}); break;
    case kNormFace: fn(std::integral_constant<int64_t, kNormFace>{}); break;
    case kCosFace: fn(std::integral_constant<int64_t, kCosFace>{}); break;
    case kArcFace: fn(std::integral_constant<int64_t, kArcFace>{}); break;
    case kCircleClass: fn(std::integral_constant<int64_t, kCircleClass>{}); break;
    default: TORCH_CHECK(false, "structloss_fast: unknown softmax transform id ", kind);
  }
}

// Rows per parallel task: about 64k elements of work each.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)); }

void check_params(int64_t transform, at::ArrayRef<double> params) {
  TORCH_CHECK(transform >= kIdentity && transform <= kCircleClass, "structloss_fast: unknown softmax transform id ",
              transform);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kNumSoftmaxParams, "structloss_fast: softmax params must have ",
              kNumSoftmaxParams, " entries (log_end, bonus_weight, label_smoothing, eps, t0, t1), got ", params.size());
  TORCH_CHECK(params[kPLogEnd] > 0.0 && params[kPLogEnd] <= 1.0, "structloss_fast: log_end must be in (0, 1]");
  TORCH_CHECK(params[kPEps] > 0.0, "structloss_fast: eps must be > 0");
  TORCH_CHECK(params[kPSmooth] >= 0.0 && params[kPSmooth] <= 1.0, "structloss_fast: label_smoothing must be in [0, 1]");
}

// Checks every target is a class index or ignore_index.
void check_targets(const Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    const int64_t y = t[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_INDEX(y >= 0 && y < C, "structloss_fast: target ", y, " at position ", i, " is out of range for ", C,
                      " classes (and is not ignore_index=", ignore_index, ")");
  }
}

Tensor class_weights_or_ones(const std::optional<Tensor>& class_weight, int64_t C, at::ScalarType acc) {
  if (class_weight.has_value() && class_weight->defined()) {
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == C, "structloss_fast: weight must be (C,) with C=", C);
    return class_weight->to(acc).contiguous();
  }
  return at::ones({C}, at::TensorOptions().dtype(acc));
}

// ---------------------------------------------------------------- class-probability targets

// F.cross_entropy's second target form: a distribution t over the classes per row (identity
// transform). The row loss is sum_j c_j f_j with c_j = w_j ((1 - ls) t_j + ls / C) (the form
// label smoothing takes with class indices), its gradient p_i S - c_i h_i with
// S = sum_k c_k h_k. The unique largest logit is the one class that may hold p > 1/2: its
// q = 1 - p comes from the other classes' sum (no cancellation), and its gradient is formed as
// p_hi (S - c_hi h_hi) - c_hi h_hi q_hi. Statistics: kSmMaxOther / kSmMax hold the row max,
// kSmCountMax how many logits equal it, kSmGradHi the largest class's gradient (kSmGradY is 0).
template <typename In, typename T, typename Out>
struct ProbRowsArgs {
  const In* raw;        // rows x C logits
  const In* prob;       // rows x C target probabilities
  Out* out;             // rows x C gradient, or nullptr
  int64_t C;
  const T* cw;          // (C,) class weights (ones when none were given)
  T* stats;             // per row kNumSoftmaxStats
  const T* row_scale;   // per row scale of the gradient, or nullptr (scale 1)
  const ElParams<T>* el;
};

// (b, h) of one class with p <= 1/2 from p alone, as phase2_segment forms them.
template <typename T>
SLF_HD void small_class_bonus(T p, const ElParams<T>& el, T& b, T& h) {
  const T q = T(1) - p;
  const bool cons = el.has_le && p > el.log_end;
  const bool clamped = !(q >= el.eps);
  b = cons ? el.log1m_le - (p - el.log_end) * el.inv_1m_le : (clamped ? el.log_eps : log1p_neg_fast(p));
  h = cons ? T(1) + el.rho * p * el.inv_1m_le : (clamped ? T(1) : T(1) + el.rho * p / q);
}

template <typename In, typename T>
inline void prob_sums(const In* raw, const In* prob, const T* cw, int64_t C, const ElParams<T>& el,
                                    T mx, T log_s, bool has_hi, T& a, T& f, T& c_hi) {
  const T keep = T(1) - el.ls, lsC = el.ls / static_cast<T>(C);
  T sa = T(0), sf = T(0), sc = T(0);
#pragma omp simd reduction(+ : sa, sf, sc)
  for (int64_t j = 0; j < C; ++j) {
    const T z = static_cast<T>(raw[j]);
    const T d = (z - mx) - log_s;
    T b, h;
    small_class_bonus(exp_fast(d), el, b, h);
    const T c = cw[j] * (keep * static_cast<T>(prob[j]) + lsC);
    const bool hi = has_hi && z == mx;
    sa += hi ? T(0) : c * h;
    sf += hi ? T(0) : c * (el.rho * b - d);
    sc += hi ? c : T(0);
  }
  a = sa;
  f = sf;
  c_hi = sc;
}

template <typename In, typename T, typename Out>
inline void prob_grad_row(const In* raw, const In* prob, Out* out, const T* cw, int64_t C,
                                        const ElParams<T>& el, T mx, T log_s, bool has_hi, T S, T g_hi, T scale) {
  const T keep = T(1) - el.ls, lsC = el.ls / static_cast<T>(C);
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    const T z = static_cast<T>(raw[j]);
    const T p = exp_fast((z - mx) - log_s);
    T b, h;
    small_class_bonus(p, el, b, h);
    const T c = cw[j] * (keep * static_cast<T>(prob[j]) + lsC);
    const T g = (has_hi && z == mx) ? g_hi : p * S - c * h;
    out[j] = static_cast<Out>(g * scale);
  }
}

template <typename In, typename T, typename Out>
SLF_CPU_MULTIVERSION void prob_forward_rows(const ProbRowsArgs<In, T, Out>& a, int64_t b, int64_t e) {
  T zbuf[kBlock];
  const Transform<T> identity(kIdentity, T(1), T(0));
  const ElParams<T>& el = *a.el;
  for (int64_t i = b; i < e; ++i) {
    const In* raw = a.raw + i * a.C;
    const In* prob = a.prob + i * a.C;
    OtherStats<T> st;
    phase1_segment<kIdentity>(raw, a.C, int64_t(-1), identity, st, zbuf);
    const T mx = st.m;
    const T s_all = st.s_below + static_cast<T>(st.n_at_max);
    const T log_s = log_(s_all);
    const bool has_hi = st.n_at_max == 1;
    T sum_ch, sum_cf, c_hi;
    prob_sums(raw, prob, a.cw, a.C, el, mx, log_s, has_hi, sum_ch, sum_cf, c_hi);
    T S = sum_ch, g_hi = T(0), loss = sum_cf;
    if (has_hi) {
      const T p_hi = T(1) / s_all, q_hi = st.s_below / s_all;
      const Bonus<T> hb = bonus_of(p_hi, q_hi, el);
      S += c_hi * hb.h;
      g_hi = p_hi * sum_ch - c_hi * hb.hq;
      loss += c_hi * (log_s + el.rho * hb.b);
    }
    T* s = a.stats + i * kNumSoftmaxStats;
    s[kSmLse] = mx + log_s;
    s[kSmRowLoss] = loss;
    s[kSmS] = S;
    s[kSmGradY] = T(0);
    s[kSmGradHi] = g_hi;
    s[kSmMaxOther] = mx;
    s[kSmCountMax] = static_cast<T>(st.n_at_max);
    s[kSmMax] = mx;
    s[kSmLogSum] = log_s;
    if (a.out) {
      prob_grad_row(raw, prob, a.out + i * a.C, a.cw, a.C, el, mx, log_s, has_hi, S, g_hi,
                    a.row_scale ? a.row_scale[i] : T(1));
    }
  }
}

template <typename In, typename T, typename Out>
SLF_CPU_MULTIVERSION void prob_backward_rows(const ProbRowsArgs<In, T, Out>& a, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const T* s = a.stats + i * kNumSoftmaxStats;
    prob_grad_row(a.raw + i * a.C, a.prob + i * a.C, a.out + i * a.C, a.cw, a.C, *a.el, s[kSmMax], s[kSmLogSum],
                  static_cast<int64_t>(s[kSmCountMax]) == 1, s[kSmS], s[kSmGradHi], a.row_scale[i]);
  }
}

// Checks of a class-probability target; returns it contiguous in the logits' dtype.
Tensor prob_target(const Tensor& target, const Tensor& logits, int64_t transform) {
  TORCH_CHECK(target.sizes() == logits.sizes(), "structloss_fast: class-probability targets must have the logits' shape");
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), "structloss_fast: class-probability targets must be floating");
  TORCH_CHECK(transform == kIdentity, "structloss_fast: class-probability targets take no margin transform");
  return target.to(logits.scalar_type()).contiguous();
}

// The forward (row_weights undefined; grad when compute_grad) or the backward (grad of
// sum_i row_weights[i] l_i) of probability targets.
std::tuple<Tensor, Tensor> prob_run(const Tensor& logits, const Tensor& target_in,
                                    const std::optional<Tensor>& class_weight, int64_t transform,
                                    at::ArrayRef<double> params, bool compute_grad, const Tensor& stats_in,
                                    const Tensor& row_weights) {
  const Tensor target = prob_target(target_in, logits, transform);
  const int64_t N = logits.size(0), C = logits.size(1);
  const bool backward_mode = row_weights.defined();
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  Tensor stats = backward_mode ? stats_in : at::empty({N, kNumSoftmaxStats}, logits.options().dtype(acc));
  Tensor grad = at::empty({compute_grad ? N : 0, C}, logits.options());
  Tensor cw = class_weights_or_ones(class_weight, C, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "structloss_fast_softmax_prob", [&] {
    using In = scalar_t;
    using T = at::opmath_type<scalar_t>;
    const ElParams<T> el(params[kPLogEnd], params[kPRho], params[kPSmooth], params[kPEps]);
    ProbRowsArgs<In, T, In> a{logits.data_ptr<In>(), target.data_ptr<In>(), compute_grad ? grad.data_ptr<In>() : nullptr,
                              C, cw.data_ptr<T>(), stats.data_ptr<T>(),
                              backward_mode ? row_weights.data_ptr<T>() : nullptr, &el};
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
      if (backward_mode) {
        prob_backward_rows(a, b, e);
      } else {
        prob_forward_rows(a, b, e);
      }
    });
  });
  return {stats, grad};
}

// ---------------------------------------------------------------- softmax_loss

std::tuple<Tensor, Tensor> softmax_loss_cpu(const Tensor& logits_in, const Tensor& target_in,
                                            const std::optional<Tensor>& class_weight, int64_t ignore_index,
                                            int64_t transform, at::ArrayRef<double> params, bool compute_grad) {
  TORCH_CHECK(logits_in.dim() == 2, "structloss_fast: softmax_loss takes (N, C) logits");
  if (target_in.dim() == 2) {  // class probabilities
    check_params(transform, params);
    TORCH_CHECK(logits_in.size(1) > 0 || logits_in.size(0) == 0, "structloss_fast: softmax_loss needs at least one class");
    return prob_run(logits_in.contiguous(), target_in, class_weight, transform, params, compute_grad, Tensor(), Tensor());
  }
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == logits_in.size(0), "structloss_fast: target must be (N,)");
  TORCH_CHECK(target_in.scalar_type() == at::kLong, "structloss_fast: target must be int64");
  check_params(transform, params);
  const Tensor logits = logits_in.contiguous();
  const Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C > 0 || N == 0, "structloss_fast: softmax_loss needs at least one class");
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  Tensor stats = at::empty({N, kNumSoftmaxStats}, logits.options().dtype(acc));
  Tensor grad = at::empty({compute_grad ? N : 0, C}, logits.options());
  Tensor cw = class_weights_or_ones(class_weight, C, acc);
  check_targets(target, C, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "structloss_fast_softmax_loss", [&] {
    using In = scalar_t;
    using T = at::opmath_type<scalar_t>;
    const Transform<T> tr(transform, static_cast<T>(params[kPT0]), static_cast<T>(params[kPT1]));
    const ElParams<T> el(params[kPLogEnd], params[kPRho], params[kPSmooth], params[kPEps]);
    RowsArgs<In, T, In> a{logits.data_ptr<In>(), compute_grad ? grad.data_ptr<In>() : nullptr, C, C, C,
                          target.data_ptr<int64_t>(), ignore_index, cw.data_ptr<T>(), stats.data_ptr<T>(), nullptr,
                          T(1), &tr, &el};
    with_transform(transform, [&](auto k) {
      constexpr int64_t K = decltype(k)::value;
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { forward_rows<K>(a, b, e); });
    });
  });
  return {stats, grad};
}

Tensor softmax_loss_backward_cpu(const Tensor& logits_in, const Tensor& target_in,
                                 const std::optional<Tensor>& class_weight, const Tensor& row_stats_in,
                                 const Tensor& row_weights_in, int64_t ignore_index, int64_t transform,
                                 at::ArrayRef<double> params) {
  TORCH_CHECK(logits_in.dim() == 2, "structloss_fast: softmax_loss_backward takes (N, C) logits");
  check_params(transform, params);
  const Tensor logits = logits_in.contiguous();
  const Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::ScalarType acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == N && row_stats_in.size(1) == kNumSoftmaxStats,
              "structloss_fast: row_stats must be (N, ", kNumSoftmaxStats, ")");
  TORCH_CHECK(row_weights_in.dim() == 1 && row_weights_in.size(0) == N, "structloss_fast: row_weights must be (N,)");
  const Tensor stats = row_stats_in.to(acc).contiguous();
  const Tensor row_w = row_weights_in.to(acc).contiguous();
  if (target.dim() == 2) {  // class probabilities
    return std::get<1>(prob_run(logits, target, class_weight, transform, params, true, stats, row_w));
  }
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong,
              "structloss_fast: target must be (N,) int64");
  Tensor grad = at::empty({N, C}, logits.options());
  Tensor cw = class_weights_or_ones(class_weight, C, acc);
  check_targets(target, C, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "structloss_fast_softmax_loss_bwd", [&] {
    using In = scalar_t;
    using T = at::opmath_type<scalar_t>;
    const Transform<T> tr(transform, static_cast<T>(params[kPT0]), static_cast<T>(params[kPT1]));
    const ElParams<T> el(params[kPLogEnd], params[kPRho], params[kPSmooth], params[kPEps]);
    RowsArgs<In, T, In> a{logits.data_ptr<In>(), grad.data_ptr<In>(), C, C, C, target.data_ptr<int64_t>(),
                          ignore_index, cw.data_ptr<T>(), const_cast<T*>(stats.data_ptr<T>()), row_w.data_ptr<T>(),
                          T(1), &tr, &el};
    with_transform(transform, [&](auto k) {
      constexpr int64_t K = decltype(k)::value;
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { backward_rows<K>(a, b, e); });
    });
  });
  return grad;
}

// ---------------------------------------------------------------- fused linear

// Elements of one logits chunk (rows x class tile) in the accumulation dtype: 32 MiB of float,
// about the size that F.linear_cross_entropy's "aspect_ratio" chunking picks for
// N=8192, H=1024, and large enough for efficient GEMMs.
constexpr int64_t kChunkElems = int64_t(1) << 23;
// Below this many rows per chunk the GEMMs get inefficient: tile the classes instead.
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kTiledRows = 128;

struct Chunking {
  int64_t rows, tile;
};

Chunking choose_chunking(int64_t N, int64_t C, int64_t row_chunk, int64_t class_tile) {
  Chunking ch;
  if (row_chunk > 0 || class_tile > 0) {
    ch.rows = row_chunk > 0 ? row_chunk : std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
    ch.tile = class_tile > 0 ? class_tile : C;
  } else {
    const int64_t rows = kChunkElems / std::max<int64_t>(C, 1);
    if (rows >= kMinChunkRows || rows >= N) {
      ch.rows = rows >= 16 ? rows - rows % 16 : rows;
      ch.tile = C;
    } else {
      ch.rows = kTiledRows;
      ch.tile = std::max<int64_t>(1, kChunkElems / kTiledRows);
    }
  }
  ch.rows = std::max<int64_t>(1, std::min(ch.rows, std::max<int64_t>(N, 1)));
  ch.tile = std::max<int64_t>(1, std::min(ch.tile, std::max<int64_t>(C, 1)));
  return ch;
}

struct LinearSpec {
  int64_t ignore_index, transform;
  std::array<bool, 3> grad_mask;  // input, weight, bias
};

// The chunk loop shared by the forward (backward_mode = false: statistics and, with any
// grad_mask bit, the gradients of the unit-weight sum of the row losses) and the recomputing backward
// (backward_mode = true: gradients of sum_i row_weights[i] l_i from the saved statistics).
template <typename T, int64_t K>
void linear_driver(const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& target, const T* cw,
                   Tensor& stats, const Tensor& row_scale, const LinearSpec& spec, const Transform<T>& tr,
                   const ElParams<T>& el, const Chunking& ch, bool backward_mode, bool want_grad, Tensor& gx,
                   Tensor& gW, Tensor& gb) {
  const int64_t N = x.size(0), C = W.size(0);
  const bool has_bias = b.defined();
  const bool ls = el.ls > T(0);
  const bool tiled = ch.tile < C;
  Tensor buf = at::empty({ch.rows, ch.tile}, x.options());
  const Tensor Wt = W.t();
  const int64_t* tgt = target.data_ptr<int64_t>();
  T* stats_p = stats.data_ptr<T>();
  const T* scale_p = row_scale.data_ptr<T>();
  std::vector<RowState<T>> states(tiled ? ch.rows : 0);

  auto logits_tile = [&](int64_t r0, int64_t t, int64_t c0, int64_t ct) {
    Tensor out = buf.narrow(0, 0, t).narrow(1, 0, ct);
    const Tensor xr = x.narrow(0, r0, t);
    const Tensor wt = tiled ? W.narrow(0, c0, ct).t() : Wt;
    if (has_bias) {
      at::addmm_out(out, b.narrow(0, c0, ct), xr, wt);
    } else {
      at::mm_out(out, xr, wt);
    }
    return out;
  };
  auto accumulate = [&](const Tensor& g, int64_t r0, int64_t t, int64_t c0, int64_t ct) {
    const Tensor xr = x.narrow(0, r0, t);
    if (spec.grad_mask[0]) {
      Tensor gxr = gx.narrow(0, r0, t);
      gxr.addmm_(g, tiled ? W.narrow(0, c0, ct) : W);
    }
    if (spec.grad_mask[1]) {
      Tensor gw = tiled ? gW.narrow(0, c0, ct) : gW;
      gw.addmm_(g.t(), xr);
    }
    if (spec.grad_mask[2] && has_bias) {
      Tensor gbt = tiled ? gb.narrow(0, c0, ct) : gb;
      gbt.add_(g.sum(0));
    }
  };

  for (int64_t r0 = 0; r0 < N; r0 += ch.rows) {
    const int64_t t = std::min(ch.rows, N - r0);
    if (!tiled) {
      Tensor lg = logits_tile(r0, t, 0, C);
      RowsArgs<T, T, T> a{lg.data_ptr<T>(), want_grad ? lg.data_ptr<T>() : nullptr, ch.tile, ch.tile, C,
                          tgt + r0, spec.ignore_index, cw, stats_p + r0 * kNumSoftmaxStats, scale_p + r0, T(1), &tr, &el};
      at::parallel_for(0, t, row_grain(C), [&](int64_t bb, int64_t ee) {
        if (backward_mode) {
          backward_rows<K>(a, bb, ee);
        } else {
          forward_rows<K>(a, bb, ee);
        }
      });
      if (want_grad) accumulate(lg, r0, t, 0, C);
      continue;
    }
    // Class tiles: the logits of a tile are recomputed for each pass over the row.
    for (int64_t i = 0; i < t; ++i) {
      RowState<T>& r = states[i];
      r = RowState<T>();
      r.y = tgt[r0 + i];
      r.ignored = r.y == spec.ignore_index;
      r.wy = r.ignored ? T(0) : cw[r.y];
      if (backward_mode && !r.ignored) load_stats(r, stats_p + (r0 + i) * kNumSoftmaxStats);
    }
    const int64_t grain = row_grain(ch.tile);
    if (!backward_mode) {
      for (int64_t c0 = 0; c0 < C; c0 += ch.tile) {
        const int64_t ct = std::min(ch.tile, C - c0);
        Tensor lg = logits_tile(r0, t, c0, ct);
        at::parallel_for(0, t, grain, [&](int64_t bb, int64_t ee) {
          tile_phase1_rows<K>(lg.data_ptr<T>(), ch.tile, c0, ct, states.data(), tr, bb, ee);
        });
      }
      for (int64_t i = 0; i < t; ++i) {
        if (!states[i].ignored) finalize_stats(states[i], tr, el);
      }
      if (ls) {
        for (int64_t c0 = 0; c0 < C; c0 += ch.tile) {
          const int64_t ct = std::min(ch.tile, C - c0);
          Tensor lg = logits_tile(r0, t, c0, ct);
          at::parallel_for(0, t, grain, [&](int64_t bb, int64_t ee) {
            tile_phase2_rows<K>(lg.data_ptr<T>(), ch.tile, c0, ct, cw, states.data(), tr, el, bb, ee);
          });
        }
      }
      for (int64_t i = 0; i < t; ++i) {
        T* s = stats_p + (r0 + i) * kNumSoftmaxStats;
        if (states[i].ignored) {
          ignored_stats(s);
        } else {
          finalize_grad(states[i], el, C);
          store_stats(states[i], s);
        }
      }
    }
    if (!want_grad) continue;
    for (int64_t c0 = 0; c0 < C; c0 += ch.tile) {
      const int64_t ct = std::min(ch.tile, C - c0);
      Tensor lg = logits_tile(r0, t, c0, ct);
      if (backward_mode) {
        // The target's raw logit is needed for its transform's derivative.
        for (int64_t i = 0; i < t; ++i) {
          const int64_t yl = states[i].y - c0;
          if (!states[i].ignored && yl >= 0 && yl < ct) states[i].raw_y = lg.data_ptr<T>()[i * ch.tile + yl];
        }
      }
      at::parallel_for(0, t, grain, [&](int64_t bb, int64_t ee) {
        tile_phase3_rows<K>(lg.data_ptr<T>(), ch.tile, c0, ct, cw, states.data(), scale_p + r0, tr, el, C, bb, ee);
      });
      accumulate(lg, r0, t, c0, ct);
    }
  }
}

void check_linear_inputs(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                         const Tensor& target) {
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2, "structloss_fast: input (N, H) and weight (C, H) must be 2-D");
  TORCH_CHECK(input.size(1) == weight.size(1), "structloss_fast: input and weight differ in H");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "structloss_fast: input and weight differ in dtype");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "structloss_fast: bias must be (C,)");
  }
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0) && target.scalar_type() == at::kLong,
              "structloss_fast: target must be (N,) int64");
}

// The per-row scale of the chunked ops' gradients: the forward's are of the unit-weight sum, the
// backward's of sum_i row_weights[i] l_i.
Tensor chunked_row_scale(const std::optional<Tensor>& row_weights, bool backward_mode, int64_t N, const Tensor& x) {
  if (!backward_mode) return at::ones({N}, x.options());
  TORCH_CHECK(row_weights->dim() == 1 && row_weights->size(0) == N, "structloss_fast: row_weights must be (N,)");
  return row_weights->to(x.scalar_type()).contiguous();
}

// fn(T(0), transform id as an integral_constant, Transform<T>, ElParams<T>) for the row kernel of
// the chunked ops in accumulation dtype acc.
template <typename Fn>
void with_row_kernel(at::ScalarType acc, int64_t transform, at::ArrayRef<double> params, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(acc, "structloss_fast_chunked_softmax_loss", [&] {
    using T = scalar_t;
    const Transform<T> tr(transform, static_cast<T>(params[kPT0]), static_cast<T>(params[kPT1]));
    const ElParams<T> el(params[kPLogEnd], params[kPRho], params[kPSmooth], params[kPEps]);
    with_transform(transform, [&](auto k) { fn(T(0), k, tr, el); });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_run(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& target,
    const std::optional<Tensor>& class_weight, const std::optional<Tensor>& row_weights,
    const std::optional<Tensor>& row_stats_in, int64_t ignore_index, int64_t transform, at::ArrayRef<double> params,
    std::array<bool, 3> grad_mask, int64_t row_chunk, int64_t class_tile, bool backward_mode) {
  check_linear_inputs(input, weight, bias, target);
  check_params(transform, params);
  const int64_t N = input.size(0), H = input.size(1), C = weight.size(0);
  TORCH_CHECK(C > 0 || N == 0, "structloss_fast: linear softmax loss needs at least one class");
  const bool has_bias = bias.has_value() && bias->defined();
  grad_mask[2] = grad_mask[2] && has_bias;
  const bool want_grad = grad_mask[0] || grad_mask[1] || grad_mask[2];
  const at::ScalarType dt = input.scalar_type();
  const at::ScalarType acc = at::toOpMathType(dt);
  // Low-precision inputs are computed in float32 throughout (fp32 logits, fp32 gradient
  // accumulation); only the returned gradients are cast back.
  const Tensor x = input.to(acc).contiguous();
  const Tensor W = weight.to(acc).contiguous();
  const Tensor b = has_bias ? bias->to(acc).contiguous() : Tensor();
  const Tensor tgt = target.contiguous();
  Tensor cw = class_weights_or_ones(class_weight, C, acc);
  check_targets(tgt, C, ignore_index);
  Tensor stats = backward_mode ? row_stats_in->to(acc).contiguous() : at::empty({N, kNumSoftmaxStats}, x.options());
  Tensor gx = at::zeros({grad_mask[0] ? N : 0, H}, x.options());
  Tensor gW = at::zeros({grad_mask[1] ? C : 0, H}, x.options());
  Tensor gb = at::zeros({grad_mask[2] ? C : 0}, x.options());
  const Chunking ch = choose_chunking(N, C, row_chunk, class_tile);
  LinearSpec spec{ignore_index, transform, grad_mask};
  const Tensor row_scale = chunked_row_scale(row_weights, backward_mode, N, x);
  if (N > 0) {
    with_row_kernel(acc, transform, params, [&](auto t0, auto k, const auto& tr, const auto& el) {
      using T = decltype(t0);
      linear_driver<T, decltype(k)::value>(x, W, b, tgt, cw.data_ptr<T>(), stats, row_scale, spec, tr, el, ch,
                                           backward_mode, want_grad, gx, gW, gb);
    });
  }
  return {stats, gx.to(dt), gW.to(dt), gb.to(dt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_softmax_loss_cpu(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& target,
    const std::optional<Tensor>& class_weight, int64_t ignore_index, int64_t transform, at::ArrayRef<double> params,
    std::array<bool, 3> grad_mask, int64_t row_chunk, int64_t class_tile) {
  return linear_run(input, weight, bias, target, class_weight, std::nullopt, std::nullopt, ignore_index, transform,
                    params, grad_mask, row_chunk, class_tile, false);
}

std::tuple<Tensor, Tensor, Tensor> linear_softmax_loss_backward_cpu(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& target,
    const std::optional<Tensor>& class_weight, const Tensor& row_stats, const Tensor& row_weights,
    int64_t ignore_index, int64_t transform, at::ArrayRef<double> params, std::array<bool, 3> grad_mask,
    int64_t row_chunk, int64_t class_tile) {
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == input.size(0) && row_stats.size(1) == kNumSoftmaxStats,
              "structloss_fast: row_stats must be (N, ", kNumSoftmaxStats, ")");
  auto out = linear_run(input, weight, bias, target, class_weight, row_weights, row_stats, ignore_index, transform,
                        params, grad_mask, row_chunk, class_tile, true);
  return {std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

// ---------------------------------------------------------------- pooled fused linear

// Classes with K centers each (weight rows k C + c, group-major): the chunk's similarities to the
// centers (rows x K C, one GEMM) are pooled to one value per class (rows x C), the row kernel
// turns those into statistics and the gradient in place, the gradient is spread back over the
// centers (the pool's derivative) and two GEMMs accumulate the input gradients. Memory: one
// chunk of rows x C K and three of rows x C, never N x C K.

struct PoolSpec {
  int64_t kind, group;
  double param;
};

// Pools rows [b, e) of S (t x K C, center k of class c in column k C + c) into P (t x C); A
// keeps what the pool's derivative needs: the index of the maximum (max) or
// log sum_k exp(g s_kc) (soft average), and V a copy of the pooled value (soft average). The
// group-major layout makes every pass a contiguous, vectorized sweep over the classes.
template <typename T>
SLF_CPU_MULTIVERSION void pool_rows(const T* S, T* P, T* A, T* V, int64_t C, const PoolSpec& ps, int64_t b,
                                    int64_t e) {
  const int64_t K = ps.group;
  const T g = static_cast<T>(ps.param);
  for (int64_t i = b; i < e; ++i) {
    const T* s = S + i * C * K;
    T* p = P + i * C;
    T* a = A + i * C;
    std::copy(s, s + C, p);
    if (ps.kind == kPoolMax) {
      std::fill(a, a + C, T(0));
      for (int64_t k = 1; k < K; ++k) {
        const T* sk = s + k * C;
        const T kk = static_cast<T>(k);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          // A NaN similarity becomes the class's value (as torch.max), and stays.
          const bool take = sk[c] > p[c] || (sk[c] != sk[c] && p[c] == p[c]);
          p[c] = take ? sk[c] : p[c];
          a[c] = take ? kk : a[c];
        }
      }
      continue;
    }
    T* v = V + i * C;  // the maximum first (in a), then the sums (in p and v)
    std::copy(s, s + C, a);
    for (int64_t k = 1; k < K; ++k) {
      const T* sk = s + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) a[c] = sk[c] > a[c] ? sk[c] : a[c];
    }
    std::fill(p, p + C, T(0));
    std::fill(v, v + C, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T* sk = s + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T w = exp_fast(g * (sk[c] - a[c]));
        v[c] += w;           // z
        p[c] += w * sk[c];   // numerator
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const T z = v[c];
      a[c] = g * a[c] + log_(z);
      p[c] = p[c] / z;
      v[c] = p[c];
    }
  }
}

// Spreads the pooled gradient G (t x C) over the centers, in place in S (t x K C): max: to the
// maximum; soft average: dp_c / ds_kc = q_k (1 + g (s_kc - p_c)), q = softmax_k(g s_.c).
template <typename T>
SLF_CPU_MULTIVERSION void unpool_rows(T* S, const T* G, const T* A, const T* V, int64_t C, const PoolSpec& ps,
                                      int64_t b, int64_t e) {
  const int64_t K = ps.group;
  const T g = static_cast<T>(ps.param);
  for (int64_t i = b; i < e; ++i) {
    T* s = S + i * C * K;
    const T* gr = G + i * C;
    const T* a = A + i * C;
    if (ps.kind == kPoolMax) {
      for (int64_t k = 0; k < K; ++k) {
        T* sk = s + k * C;
        const T kk = static_cast<T>(k);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sk[c] = a[c] == kk ? gr[c] : T(0);
      }
      continue;
    }
    const T* v = V + i * C;
    for (int64_t k = 0; k < K; ++k) {
      T* sk = s + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T q = exp_fast(g * sk[c] - a[c]);
        sk[c] = gr[c] * q * (T(1) + g * (sk[c] - v[c]));
      }
    }
  }
}

template <typename T, int64_t Kt>
void pooled_driver(const Tensor& x, const Tensor& W, const Tensor& target, const T* cw, Tensor& stats,
                   const Tensor& row_scale, int64_t ignore_index, const PoolSpec& ps, const Transform<T>& tr,
                   const ElParams<T>& el, bool backward_mode, std::array<bool, 2> grad_mask, Tensor& gx, Tensor& gW) {
  const int64_t N = x.size(0), CK = W.size(0), C = CK / ps.group;
  const bool want_grad = grad_mask[0] || grad_mask[1];
  int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(CK, 1));
  if (rows >= 16) rows -= rows % 16;
  rows = std::min(rows, N);
  Tensor S = at::empty({rows, CK}, x.options());
  Tensor P = at::empty({rows, C}, x.options());
  Tensor A = at::empty({rows, C}, x.options());
  Tensor V = at::empty({ps.kind == kPoolSoftAvg ? rows : 0, C}, x.options());
  const Tensor Wt = W.t();
  const int64_t* tgt = target.data_ptr<int64_t>();
  T* stats_p = stats.data_ptr<T>();
  const T* scale_p = row_scale.data_ptr<T>();
  const int64_t pool_grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(CK, 1));
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t t = std::min(rows, N - r0);
    Tensor s = S.narrow(0, 0, t);
    const Tensor xr = x.narrow(0, r0, t);
    at::mm_out(s, xr, Wt);
    T* Sp = s.data_ptr<T>();
    T* Pp = P.data_ptr<T>();
    T* Ap = A.data_ptr<T>();
    T* Vp = V.numel() ? V.data_ptr<T>() : nullptr;
    at::parallel_for(0, t, pool_grain, [&](int64_t b, int64_t e) { pool_rows(Sp, Pp, Ap, Vp, C, ps, b, e); });
    RowsArgs<T, T, T> a{Pp, want_grad ? Pp : nullptr, C, C, C, tgt + r0, ignore_index, cw,
                        stats_p + r0 * kNumSoftmaxStats, scale_p + r0, T(1), &tr, &el};
    at::parallel_for(0, t, row_grain(C), [&](int64_t b, int64_t e) {
      if (backward_mode) {
        backward_rows<Kt>(a, b, e);
      } else {
        forward_rows<Kt>(a, b, e);
      }
    });
    if (!want_grad) continue;
    at::parallel_for(0, t, pool_grain, [&](int64_t b, int64_t e) { unpool_rows(Sp, Pp, Ap, Vp, C, ps, b, e); });
    if (grad_mask[0]) gx.narrow(0, r0, t).addmm_(s, W);
    if (grad_mask[1]) gW.addmm_(s.t(), xr);
  }
}

std::tuple<Tensor, Tensor, Tensor> pooled_run(const Tensor& input, const Tensor& weight, const Tensor& target,
                                              const std::optional<Tensor>& class_weight,
                                              const std::optional<Tensor>& row_weights,
                                              const std::optional<Tensor>& row_stats_in, int64_t ignore_index,
                                              int64_t transform, at::ArrayRef<double> params, int64_t pool,
                                              int64_t group, double pool_param, std::array<bool, 2> grad_mask,
                                              bool backward_mode) {
  check_linear_inputs(input, weight, std::nullopt, target);
  check_params(transform, params);
  TORCH_CHECK(pool >= 0 && pool < kNumSoftmaxPools, "structloss_fast: unknown pool id ", pool);
  TORCH_CHECK(group >= 1 && weight.size(0) % group == 0,
              "structloss_fast: weight must have group (", group, ") rows per class, got ", weight.size(0), " rows");
  const int64_t N = input.size(0), H = input.size(1), C = weight.size(0) / group;
  TORCH_CHECK(C > 0 || N == 0, "structloss_fast: pooled linear softmax loss needs at least one class");
  const at::ScalarType dt = input.scalar_type();
  const at::ScalarType acc = at::toOpMathType(dt);
  const Tensor x = input.to(acc).contiguous();
  const Tensor W = weight.to(acc).contiguous();
  const Tensor tgt = target.contiguous();
  Tensor cw = class_weights_or_ones(class_weight, C, acc);
  check_targets(tgt, C, ignore_index);
  Tensor stats = backward_mode ? row_stats_in->to(acc).contiguous() : at::empty({N, kNumSoftmaxStats}, x.options());
  Tensor gx = at::zeros({grad_mask[0] ? N : 0, H}, x.options());
  Tensor gW = at::zeros({grad_mask[1] ? weight.size(0) : 0, H}, x.options());
  const Tensor row_scale = chunked_row_scale(row_weights, backward_mode, N, x);
  const PoolSpec ps{pool, group, pool_param};
  if (N > 0) {
    with_row_kernel(acc, transform, params, [&](auto t0, auto k, const auto& tr, const auto& el) {
      using T = decltype(t0);
      pooled_driver<T, decltype(k)::value>(x, W, tgt, cw.data_ptr<T>(), stats, row_scale, ignore_index, ps, tr, el,
                                           backward_mode, grad_mask, gx, gW);
    });
  }
  return {stats, gx.to(dt), gW.to(dt)};
}

std::tuple<Tensor, Tensor, Tensor> pooled_linear_softmax_loss_cpu(
    const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& class_weight,
    int64_t ignore_index, int64_t transform, at::ArrayRef<double> params, int64_t pool, int64_t group,
    double pool_param, std::array<bool, 2> grad_mask) {
  return pooled_run(input, weight, target, class_weight, std::nullopt, std::nullopt, ignore_index, transform, params,
                    pool, group, pool_param, grad_mask, false);
}

std::tuple<Tensor, Tensor> pooled_linear_softmax_loss_backward_cpu(
    const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& class_weight,
    const Tensor& row_stats, const Tensor& row_weights, int64_t ignore_index, int64_t transform,
    at::ArrayRef<double> params, int64_t pool, int64_t group, double pool_param, std::array<bool, 2> grad_mask) {
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == input.size(0) && row_stats.size(1) == kNumSoftmaxStats,
              "structloss_fast: row_stats must be (N, ", kNumSoftmaxStats, ")");
  auto out = pooled_run(input, weight, target, class_weight, row_weights, row_stats, ignore_index, transform, params,
                        pool, group, pool_param, grad_mask, true);
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("softmax_loss", &softmax_loss_cpu);
  m.impl("softmax_loss_backward", &softmax_loss_backward_cpu);
  m.impl("linear_softmax_loss", &linear_softmax_loss_cpu);
  m.impl("linear_softmax_loss_backward", &linear_softmax_loss_backward_cpu);
  m.impl("pooled_linear_softmax_loss", &pooled_linear_softmax_loss_cpu);
  m.impl("pooled_linear_softmax_loss_backward", &pooled_linear_softmax_loss_backward_cpu);
}

}  // namespace structloss_fast
