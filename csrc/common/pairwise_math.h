// The per-pair math of the pairwise engine, shared by the CPU and CUDA epilogues.
//
// Every loss is reduced from per-anchor *terms* (spec: structloss_fast/reference/pairwise.py):
//   mean: gate * sum_k S_k / max(C_k, 1),   sum: gate * sum_k S_k,   none: per anchor,
// with S_k = sum over anchors of term k and C_k the count its PML reducer divides by. The
// epilogues write, per anchor, the row statistics below; the driver reduces them.
#pragma once

#include "math.h"

namespace structloss_fast {

// Loss identifiers: part of the op schema (the `loss` int argument). Keep in sync with
// structloss_fast/ops/pairwise.py.
enum PairLossKind : int64_t {
  kCircle = 0,           // params: m, gamma
  kUnified = 1,          // params: m, gamma
  kMultiSimilarity = 2,  // params: alpha, beta, base
  kSupCon = 3,           // params: temperature
  kNTXent = 4,           // params: temperature
  kContrastive = 5,      // params: pos_margin, neg_margin
  kTripletAll = 6,       // params: margin
  kTripletHard = 7,      // params: margin
  kNumPairLosses = 8,
};

enum ReductionKind : int64_t {
  kReductionNone = 0,
  kReductionMean = 1,
  kReductionSum = 2,
};

// Columns of the per-anchor statistics tensor (B x kNumRowStats).
enum RowStat : int64_t {
  kAux0 = 0,      // loss-specific (LSE of the positives, of all pairs, of the negatives, index of the hardest positive)
  kAux1 = 1,      // loss-specific (LSE of the negatives, mean positive logit, NT-Xent's sum of sigmoids, hardest negative)
  kSum0 = 2,      // term 0 of this anchor
  kCount0 = 3,    // what term 0 adds to its reducer's count
  kSum1 = 4,      // term 1 (contrastive: negative pairs)
  kCount1 = 5,
  kNumPos = 6,    // positives of this anchor (self excluded)
  kNumNeg = 7,    // negatives of this anchor
  kNumRowStats = 8,
};

SLF_HD int64_t pair_loss_terms(int64_t kind) { return kind == kContrastive ? 2 : 1; }
SLF_HD int64_t pair_loss_params(int64_t kind) {
  switch (kind) {
    case kCircle: case kUnified: case kContrastive: return 2;
    case kMultiSimilarity: return 3;
    default: return 1;
  }
}
// PML returns 0 for the whole batch when it has no positive or no negative pair.
SLF_HD bool pair_loss_gated(int64_t kind) { return kind == kSupCon || kind == kNTXent; }
// Losses averaged over non-zero per-anchor losses: an anchor whose loss is not counted gets no
// gradient (its loss is 0 up to underflow).
SLF_HD bool pair_loss_row_counted(int64_t kind) {
  return kind == kCircle || kind == kUnified || kind == kSupCon || kind == kTripletHard;
}

// What a pairwise op computes: the loss, its parameters, and which pairs are self-pairs.
struct PairwiseSpec {
  int64_t loss;         // PairLossKind
  double p[3];          // the loss's parameters, in schema order (unused ones 0)
  int64_t self_offset;  // -1: no self pairs; else anchor i is reference (self_offset + i) mod M
  bool ref_is_x;        // ref is x itself: reference gradients fold into grad_x
  SLF_HD int64_t terms() const { return pair_loss_terms(loss); }
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

// Euclidean distance of unit vectors from their cosine similarity, sqrt(2 - 2s), and its
// derivative; at distance 0 the derivative is 0, as torch.cdist's.
template <typename T>
SLF_HD T unit_distance(T s) {
  T sq = T(2) - T(2) * s;
  sq = sq < T(0) ? T(0) : sq;
  return sqrt_(sq);
}
template <typename T>
SLF_HD T unit_distance_grad(T d) {
  return d > T(0) ? T(-1) / d : (d != d ? d : T(0));
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

}  // namespace structloss_fast
