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

}  // namespace structloss_fast
