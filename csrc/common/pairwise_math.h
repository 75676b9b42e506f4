// The per-pair math of the pairwise engine, shared by the CPU and CUDA epilogues.
//
// Every loss is a sum of per-anchor *terms* (docs/spec/pairwise.md). The epilogues write,
// per anchor, the row statistics of csrc/common/ids.h (PairStat): each term's value and what it
// adds to its reducer's count; the Python glue (structloss_fast/pairwise/_ops.py) reduces them.
#pragma once

#include "ids.h"
#include "math.h"

namespace structloss_fast {

SLF_HD int64_t pair_loss_terms(int64_t kind) { return pair_loss_info(kind).terms; }
SLF_HD int64_t pair_loss_params(int64_t kind) { return pair_loss_info(kind).params; }
SLF_HD bool pair_loss_row_counted(int64_t kind) { return pair_loss_info(kind).row_counted; }
// The losses with a parameter per anchor (PairwiseSpec::row_params; op pairwise_loss_rowparam).
SLF_HD bool pair_loss_has_row_params(int64_t kind) { return kind == kMarginAll; }

// Which fused miner each loss's epilogue applies: the pair miners in the two-set losses and
// contrastive, the triplet window in all-triplets, the easy/hard picks in one-triplet-per-anchor.
SLF_HD bool pair_miner_fuses(int64_t loss, int64_t miner) {
  switch (miner) {
    case kMinerNone: return true;
    case kMinerMultiSimilarity:
    case kMinerPairMargin:
      return loss == kCircle || loss == kUnified || loss == kMultiSimilarity || loss == kContrastive;
    case kMinerTripletWindow: return loss == kTripletAll;
    case kMinerEasyHard: return loss == kTripletHard;
    default: return false;
  }
}

// What a pairwise op computes: the loss, its parameters, which pairs are self-pairs, and the
// optional PairExtParam block (pair values of a non-default distance, a fused miner).
struct PairwiseSpec {
  int64_t loss;         // PairLossKind (ids.h)
  double p[3];          // the loss's parameters, in schema order (unused ones 0)
  int64_t self_offset;  // -1: no self pairs; else anchor i is reference (self_offset + i) mod M
  bool ref_is_x;        // ref is x itself: reference gradients fold into grad_x
  int64_t value = kValueGemm;  // PairValue
  double power = 1.0;
  bool raw_norms = false;
  int64_t miner = kMinerNone;  // PairMiner
  double mp[3] = {0.0, 0.0, 0.0};
  // Per-anchor parameters (B,) in the strip's dtype, for the losses that take them (MarginLoss's
  // beta; op pairwise_loss_rowparam), else null. Indexed by the anchor's row in x.
  const void* row_params = nullptr;
  SLF_HD int64_t terms() const { return pair_loss_terms(loss); }
  // The distance losses read the strip as their distance instead of computing it from g.
  SLF_HD bool direct() const { return value != kValueGemm; }
  // A miner sees the anchor's own reference slot as a positive candidate when the references
  // are another set (a memory queue): pytorch-metric-learning's CrossBatchMemory mines first
  // and removes the self pairs from the mined tuple afterwards. Without references the
  // diagonal is no candidate.
  SLF_HD bool miner_sees_self() const { return !ref_is_x; }
};

// The reference column of anchor i itself, or -1.
SLF_HD int64_t self_column(const PairwiseSpec& spec, int64_t i, int64_t M) {
  return (spec.self_offset >= 0 && M > 0) ? (spec.self_offset + i) % M : -1;
}

// A loss term counts for PML's AvgNonZeroReducer when it is > 0; NaN counts too, so that a
// non-finite input gives a non-finite loss instead of being filtered out.
template <typename T>
SLF_HD bool row_counts(T v) {
  return !(v <= T(0));
}

// d/dx relu(x) as torch computes it (0 at 0), NaN kept.
template <typename T>
SLF_HD T relu_grad(T x) {
  return x > T(0) ? T(1) : (x != x ? x : T(0));
}

// Euclidean distance ||x_i - r_j|| from g = x_i . r_j and the rows' squared norms,
// sqrt(max(n_i + n_j - 2 g, 0)) (for normalized rows n is 1, or 0 for a zero row, which
// F.normalize leaves at 0: its distance to a unit row is 1), and its derivative in g; at
// distance 0 the derivative is 0, as torch.cdist's.
template <typename T>
SLF_HD T pair_distance(T g, T ni, T nj) {
  T sq = (ni + nj) - T(2) * g;
  sq = sq < T(0) ? T(0) : sq;
  return sqrt_(sq);
}
template <typename T>
SLF_HD T pair_distance_grad(T d) {
  return d > T(0) ? T(-1) / d : (d != d ? d : T(0));
}

// The Euclidean distance of unit vectors from their cosine similarity, sqrt(2 - 2s) (its
// derivative is pair_distance_grad): the losses ported from PML read it (their strips are shifted
// so that it is the distance of the rows themselves, shift_to_pair_distances).
template <typename T>
SLF_HD T unit_distance(T s) {
  return pair_distance(s, T(1), T(1));
}

// A fused miner's keep rules for one anchor's pairs: positive (negative) pair j is kept when
// !(sp * v_j + op >= tp) (resp. sn, on, tn), v the value the epilogue reads. Written negated
// so that a NaN pair is kept (a non-finite input gives a non-finite loss) and so that the
// default window (tp = tn = inf) keeps every pair. PML's comparisons are reproduced exactly:
// sp * v + op is v - eps or -(v + eps) (sp = +-1), rounded as PML rounds them.
template <typename T>
struct PairWindow {
  T sp = T(1), op = T(0), tp = static_cast<T>(INFINITY), sn = T(1), on = T(0), tn = static_cast<T>(INFINITY);
  SLF_HD bool pos(T v) const { return !(sp * v + op >= tp); }
  SLF_HD bool neg(T v) const { return !(sn * v + on >= tn); }
};

// The window of a pair miner (kMinerMultiSimilarity, kMinerPairMargin) for an anchor; sigma =
// +1 for a similarity loss, -1 for a distance loss (u = sigma * v). For multi-similarity,
// max_neg_u = max over the negatives of u and max_pos_neg_u = max over the positives of -u
// (both -inf over an empty set, which keeps nothing of the other set, as PML).
template <typename T>
SLF_HD PairWindow<T> pair_window(const PairwiseSpec& spec, T sigma, T max_neg_u, T max_pos_neg_u) {
  PairWindow<T> w;
  if (spec.miner == kMinerMultiSimilarity) {
    const T eps = static_cast<T>(spec.mp[0]);
    w.sp = sigma;  // u - eps < max_N u
    w.op = -eps;
    w.tp = max_neg_u;
    w.sn = -sigma;  // -(u + eps) < max_P (-u)  <=>  u + eps > min_P u
    w.on = -eps;
    w.tn = max_pos_neg_u;
  } else if (spec.miner == kMinerPairMargin) {
    w.sp = sigma;  // u < pos
    w.tp = static_cast<T>(spec.mp[0]);
    w.sn = -sigma;  // -u < -neg  <=>  u > neg
    w.tn = -static_cast<T>(spec.mp[1]);
  }
  return w;
}

// ---- two-set losses: l = combine(LSE_P a_pos(s), LSE_N a_neg(s)) ----

// Circle loss: O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m; alphas detached.
template <typename T>
struct CircleLogits {
  T gamma, op, on, delta_p, delta_n;
  SLF_HD CircleLogits(T m, T gamma_) : gamma(gamma_), op(T(1) + m), on(-m), delta_p(T(1) - m), delta_n(m) {}
  SLF_HD T pos(T s) const { return -gamma * relu(op - s) * (s - delta_p); }
  SLF_HD T pos_grad(T s) const { return -gamma * relu(op - s); }
  SLF_HD T neg(T s) const { return gamma * relu(s - on) * (s - delta_n); }
  SLF_HD T neg_grad(T s) const { return gamma * relu(s - on); }
};

// Unified loss (paper Eq. 1): positives -gamma s, negatives gamma (s + m).
template <typename T>
struct UnifiedLogits {
  T gamma, m;
  SLF_HD UnifiedLogits(T m_, T gamma_) : gamma(gamma_), m(m_) {}
  SLF_HD T pos(T s) const { return -gamma * s; }
  SLF_HD T pos_grad(T) const { return -gamma; }
  SLF_HD T neg(T s) const { return gamma * (s + m); }
  SLF_HD T neg_grad(T) const { return gamma; }
};

// Multi-similarity: positives alpha (base - s), negatives beta (s - base).
template <typename T>
struct MultiSimilarityLogits {
  T alpha, beta, base;
  SLF_HD MultiSimilarityLogits(T alpha_, T beta_, T base_) : alpha(alpha_), beta(beta_), base(base_) {}
  SLF_HD T pos(T s) const { return alpha * (base - s); }
  SLF_HD T pos_grad(T) const { return -alpha; }
  SLF_HD T neg(T s) const { return beta * (s - base); }
  SLF_HD T neg_grad(T) const { return beta; }
};

template <typename T>
struct TwoSetResult {
  T loss, dlse_pos, dlse_neg;  // row loss and its derivatives wrt the two log-sum-exps
};

// Circle / unified: softplus(LSE_P + LSE_N) (torch.nn.Softplus, threshold 20), 0 unless both
// sets are non-empty.
template <typename T>
SLF_HD TwoSetResult<T> combine_joint(T lse_p, T lse_n, bool has_p, bool has_n) {
  if (!(has_p && has_n)) return {T(0), T(0), T(0)};
  const T z = lse_p + lse_n;
  const T g = softplus_grad(z);
  return {softplus(z), g, g};
}

// Multi-similarity: (1/alpha) log(1 + e^{LSE_P}) + (1/beta) log(1 + e^{LSE_N}), each 0 for an
// empty set.
template <typename T>
SLF_HD TwoSetResult<T> combine_separate(T lse_p, T lse_n, T inv_alpha, T inv_beta) {
  return {inv_alpha * softplus_exact(lse_p) + inv_beta * softplus_exact(lse_n), inv_alpha * sigmoid(lse_p),
          inv_beta * sigmoid(lse_n)};
}

// ---- generalized lifted structure: relu(LSE_P (d - pos_margin) + LSE_N (neg_margin - d)) ----

// Logits in the distance d = sqrt(2 - 2s) of the unit vectors; derivatives with respect to s.
template <typename T>
struct GenLiftedLogits {
  T pos_margin, neg_margin;
  SLF_HD GenLiftedLogits(T pm, T nm) : pos_margin(pm), neg_margin(nm) {}
  SLF_HD T pos(T s) const { return unit_distance(s) - pos_margin; }
  SLF_HD T pos_grad(T s) const { return pair_distance_grad(unit_distance(s)); }
  SLF_HD T neg(T s) const { return neg_margin - unit_distance(s); }
  SLF_HD T neg_grad(T s) const { return -pair_distance_grad(unit_distance(s)); }
};

// relu(LSE_P + LSE_N) where an empty set's LSE counts as 0 (PML's masked log-sum-exp).
template <typename T>
SLF_HD TwoSetResult<T> combine_relu(T lse_p, T lse_n, bool has_p, bool has_n) {
  const T z = (has_p ? lse_p : T(0)) + (has_n ? lse_n : T(0));
  const T g = relu_grad(z);
  return {relu(z), has_p ? g : T(0), has_n ? g : T(0)};
}

// ---- one-positive-per-pair softmax losses: sum_{p in P} softplus(LSE_N a_neg - a_pos(s_p)) ----

// NT-Xent: a = s / t for both sets.
template <typename T>
struct NTXentLogits {
  T inv_t;
  SLF_HD explicit NTXentLogits(T inv_t_) : inv_t(inv_t_) {}
  SLF_HD T pos(T s) const { return s * inv_t; }
  SLF_HD T pos_grad(T) const { return inv_t; }
  SLF_HD T neg(T s) const { return s * inv_t; }
  SLF_HD T neg_grad(T) const { return inv_t; }
};

// Tuplet margin: positives scale * cos(theta - margin) with theta = acos(s), negatives scale * s.
// cos(theta - m) = c cos m + sin(theta) sin m with c = clamp(s, -1, 1); its derivative
// cos m - c sin m / sin(theta) (sin(theta) = 0: cos m; |s| > 1: 0, clamped).
template <typename T>
struct TupletLogits {
  T scale, cos_m, sin_m;
  SLF_HD TupletLogits(double margin, T scale_)
      : scale(scale_), cos_m(static_cast<T>(cos(margin))), sin_m(static_cast<T>(sin(margin))) {}
  SLF_HD T pos(T s) const {
    const T c = s > T(1) ? T(1) : (s < T(-1) ? T(-1) : s);
    const T sq = (T(1) - c) * (T(1) + c);
    return scale * (c * cos_m + sqrt_(sq > T(0) ? sq : T(0)) * sin_m);
  }
  SLF_HD T pos_grad(T s) const {
    const T sq = (T(1) - s) * (T(1) + s);
    const T g = sq > T(0) ? cos_m - s * sin_m / sqrt_(sq) : cos_m;
    return (s > T(1) || s < T(-1)) ? T(0) : scale * g;
  }
  SLF_HD T neg(T s) const { return scale * s; }
  SLF_HD T neg_grad(T) const { return scale; }
};

// ---- FastAP: soft histograms of the squared distances d2 = 2 - 2s in num_bins + 1 triangular bins ----

template <typename T>
struct FastApBins {
  int64_t edges;  // num_bins + 1
  T delta;        // bin width 4 / num_bins (the squared distance of unit vectors lies in [0, 4])
  SLF_HD explicit FastApBins(int64_t num_bins) : edges(num_bins + 1), delta(T(4) / static_cast<T>(num_bins)) {}
  // Center of bin k, as torch.linspace(0, 4, edges) places it.
  SLF_HD T center(int64_t k) const {
    const int64_t half = edges / 2;
    const T step = T(4) / static_cast<T>(edges - 1);
    return k < half ? step * static_cast<T>(k) : T(4) - step * static_cast<T>(edges - 1 - k);
  }
  // relu(1 - |d2 - c| / delta) and its derivative in d2 (torch's: 0 where the relu or the abs is 0).
  SLF_HD T pulse(T d2, T c) const {
    const T u = d2 - c;
    return relu(T(1) - (u < T(0) ? -u : u) / delta);
  }
  SLF_HD T pulse_grad(T d2, T c) const {
    const T u = d2 - c;
    const T sgn = u > T(0) ? T(1) : (u < T(0) ? T(-1) : T(0));
    return T(1) - (u < T(0) ? -u : u) / delta > T(0) ? -sgn / delta : T(0);
  }
};

// Squared distance of unit vectors from their cosine, clamped at 0, and its derivative (0 at the
// clamp: torch.cdist's gradient at distance 0, squared).
template <typename T>
SLF_HD T unit_sq_distance(T s) {
  const T d2 = T(2) - T(2) * s;
  return d2 > T(0) ? d2 : (d2 != d2 ? d2 : T(0));
}
template <typename T>
SLF_HD T unit_sq_distance_grad(T s) {
  const T d2 = T(2) - T(2) * s;
  return d2 > T(0) ? T(-2) : (d2 != d2 ? d2 : T(0));
}

}  // namespace structloss_fast
