// The per-pair math of the pairwise engine, shared by the CPU and CUDA epilogues.
//
// A "two-set" loss maps each similarity s_ij to a logit a_ij, with one formula for the
// positives P(i) and one for the negatives N(i), and combines the row as
//     l_i = softplus(LSE_{P(i)} a_ij + LSE_{N(i)} a_ij)      (0 when P(i) or N(i) is empty).
// Circle loss and the paper's unified loss (Eq. 1) are both of this form; they differ only in
// the logits. The derivative da/ds treats Circle's alpha weights as constants (detached), as
// the paper and pytorch-metric-learning do.
#pragma once

#include "math.h"

namespace structloss_fast {

// Loss identifiers: part of the op schema (the `loss` int argument). Keep in sync with
// structloss_fast/ops/pairwise.py.
enum PairLossKind : int64_t {
  kCircle = 0,
  kUnified = 1,
};

enum ReductionKind : int64_t {
  kReductionNone = 0,
  kReductionMean = 1,
  kReductionSum = 2,
};

// Columns of the per-row statistics tensor (B x 3) that the forward saves.
enum RowStat : int64_t { kLsePos = 0, kLseNeg = 1, kRowLoss = 2, kNumRowStats = 3 };

// Circle loss: O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m.
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

// Row loss from the two log-sum-exps; rows missing a positive or a negative give 0.
template <typename T>
SLF_HD T twoset_row_loss(T lse_pos, T lse_neg, bool has_pos, bool has_neg) {
  return (has_pos && has_neg) ? softplus(lse_pos + lse_neg) : T(0);
}

// A row contributes to "mean" (and gets a gradient) when its loss is not <= 0: PML's
// AvgNonZeroReducer keeps losses > 0; NaN rows are kept too so that non-finite input gives a
// non-finite loss instead of being filtered out.
template <typename T>
SLF_HD bool row_counts(T row_loss) {
  return !(row_loss <= T(0));
}

}  // namespace structloss_fast
