// Every identifier that crosses the C++ / Python / Triton boundary, written once.
//
// structloss_fast/_ids.py holds the same enums for Python and the Triton kernels;
// tests/test_ids.py parses this file and fails on any difference, so an enum is changed here
// and in _ids.py together. Naming rule checked by that test: an enumerator `kPrefixCamelName`
// of an enum with Python prefix `Prefix` is `CAMEL_NAME` in Python; `kNum...` is the count.
//
// Losses never take a reduction: every kernel returns per-row statistics and the Python glue
// of each family reduces them (structloss_fast/<family>/_ops.py), for every backend alike.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SLF_IDS_HD __host__ __device__
#else
#define SLF_IDS_HD
#endif

namespace structloss_fast {

// ---- pairwise family ----

// The `loss` argument of pairwise_loss; params are the loss's parameters in this order.
enum PairLossKind : int64_t {
  kCircle = 0,           // m, gamma
  kUnified = 1,          // m, gamma
  kMultiSimilarity = 2,  // alpha, beta, base
  kSupCon = 3,           // temperature
  kNTXent = 4,           // temperature
  kContrastive = 5,      // pos_margin, neg_margin
  kTripletAll = 6,       // margin
  kTripletHard = 7,      // margin
  kGenLifted = 8,        // pos_margin, neg_margin (generalized lifted structure)
  kTupletMargin = 9,     // margin (radians), scale
  kMarginAll = 10,       // margin; beta per anchor (pairwise_loss_rowparam only)
  kFastAp = 11,          // num_bins
  kNumPairLosses = 12,
};

// Facts about each pairwise loss, indexed by PairLossKind: how many terms it is the sum of
// (each with its own reducer count), how many parameters it takes, whether a batch without any
// positive or any negative pair gives 0 (gated, as pytorch-metric-learning's SupCon / NT-Xent),
// and whether an anchor's term counts for the reducer only when it is non-zero (row_counted:
// such an anchor gets no gradient).
struct PairLossInfo {
  int64_t terms, params;
  bool gated, row_counted;
};
SLF_IDS_HD constexpr PairLossInfo pair_loss_info(int64_t kind) {
  switch (kind) {
    //                            terms, params, gated, row_counted
    case kCircle:          return {1, 2, false, true};
    case kUnified:         return {1, 2, false, true};
    case kMultiSimilarity: return {1, 3, false, false};
    case kSupCon:          return {1, 1, true, true};
    case kNTXent:          return {1, 1, true, false};
    case kContrastive:     return {2, 2, false, false};
    case kTripletAll:      return {1, 1, false, false};
    case kTripletHard:     return {1, 1, false, true};
    case kGenLifted:       return {1, 2, false, false};
    case kTupletMargin:    return {1, 2, true, false};
    case kMarginAll:       return {1, 1, false, false};
    case kFastAp:          return {1, 1, false, false};
    default:               return {0, 0, false, false};
  }
}

// Columns of the pairwise row statistics (B x kNumPairStats), one row per anchor.
enum PairStat : int64_t {
  kPairAux0 = 0,    // loss-specific: LSE of the positives / of all pairs / of the negatives; index of the hardest positive
  kPairAux1 = 1,    // loss-specific: LSE of the negatives / mean positive logit / NT-Xent's sum of sigmoids; hardest negative
  kPairSum0 = 2,    // term 0 of this anchor
  kPairCount0 = 3,  // what term 0 adds to its reducer's count
  kPairSum1 = 4,    // term 1 (contrastive: the negative pairs)
  kPairCount1 = 5,
  kPairNumPos = 6,  // positives of this anchor (itself excluded)
  kPairNumNeg = 7,  // negatives of this anchor
  kNumPairStats = 8,
};

// The `grad_mode` of pairwise_loss: which gradients the forward computes besides the statistics.
enum PairGradMode : int64_t {
  kGradNone = 0,
  kGradX = 1,     // of x
  kGradXRef = 2,  // of x and ref
  kNumPairGradModes = 3,
};

// Optional block at the end of pairwise_loss's `params`, after the loss's own parameters: the
// pair values of a non-default distance and a fused miner (structloss_fast/pairwise/_ops.py
// writes it; absent means kValueGemm, power 1, normalized rows, no miner). The Triton kernels
// take no block: their check_supported refuses such problems.
enum PairExtParam : int64_t {
  kExtValue = 0,     // PairValue
  kExtPower = 1,     // the distance's power q (kValueDistPow, kValueNegDistPow)
  kExtRawNorms = 2,  // 1: rows not normalized; the gradient through their norms is added
  kExtMiner = 3,     // PairMiner
  kExtMiner0 = 4,    // the miner's parameters (PairMiner's comments)
  kExtMiner1 = 5,
  kExtMiner2 = 6,
  kNumPairExtParams = 7,
};

// What a strip holds when the epilogue reads it. g = x_i . r_j (the GEMM); d = ||x_i - r_j||
// from the rows' squared norms, sqrt(max(n_i + n_j - 2 g, 0)). The similarity losses read the
// strip as their similarity; the distance losses (contrastive, triplet) compute d inline from
// g (kValueGemm) or read the strip as their distance (the others).
enum PairValue : int64_t {
  kValueGemm = 0,        // g as it is (cosine or dot-product similarity; inline d)
  kValueNegGemm = 1,     // -g: a similarity given to a distance loss
  kValueDistPow = 2,     // d^q: a distance loss with a power
  kValueNegDistPow = 3,  // -d^q: a distance given to a similarity loss
  kNumPairValues = 4,
};

// A miner fused into the loss's pass. Its rules are written on u = the pair value oriented as
// a similarity (u = v for the similarity losses, -v for the distance losses), so one rule
// serves both orientations; Python converts PML's thresholds to u.
enum PairMiner : int64_t {
  kMinerNone = 0,
  kMinerMultiSimilarity = 1,  // epsilon: positive kept if u - eps < max_N u, negative if u + eps > min_P u
  kMinerPairMargin = 2,       // (pos, neg): positive kept if u < pos, negative if u > neg
  kMinerTripletWindow = 3,    // (lo, hi): triplet kept if lo < u_ap - u_an <= hi (TripletMarginMiner)
  kMinerEasyHard = 4,         // (pos pick, neg pick) as PairPick: one triplet per anchor (BatchEasyHardMiner)
  kNumPairMiners = 5,
};

// BatchEasyHardMiner's choice of an anchor's positive or negative.
enum PairPick : int64_t {
  kPickHard = 0,      // positive: least similar; negative: most similar
  kPickEasy = 1,      // positive: most similar; negative: least similar
  kPickSemihard = 2,  // relative to the other pick: positive more similar than it (the least so), negative less
  kNumPairPicks = 3,
};

// ---- softmax family ----

// The `transform` argument: how a row's raw values become logits.
enum SoftmaxTransform : int64_t {
  kIdentity = 0,     // z = r (plain logits)
  kNormFace = 1,     // z = s r
  kCosFace = 2,      // z = s (r - m [j == y])
  kArcFace = 3,      // z_y = s cos(theta_y + m) (theta_y <= pi - m), else s (r - m sin m)
  kCircleClass = 4,  // z_y = g relu(1 + m - r)(r - 1 + m), z_j = g relu(r + m)(r - m)
  kNumSoftmaxTransforms = 5,
};

// Columns of the softmax row statistics (N x kNumSoftmaxStats) that the forward saves; the
// backward writes the gradient from them in one pass.
enum SoftmaxStat : int64_t {
  kSmLse = 0,       // L
  kSmRowLoss = 1,   // the row's loss (0 for an ignored row)
  kSmS = 2,         // S = sum_k c_k h_k
  kSmGradY = 3,     // dl/dz_y (unscaled)
  kSmGradHi = 4,    // dl/dz of the unique largest non-target logit (label smoothing)
  kSmMaxOther = 5,  // largest non-target logit
  kSmCountMax = 6,  // how many non-target logits equal it
  kSmMax = 7,       // the row's largest logit m, and
  kSmLogSum = 8,    // log sum_k exp(z_k - m) (L = m + this; p_j = exp((z_j - m) - this) keeps
                    // z_j - m exact instead of carrying L's rounding into every p_j)
  kNumSoftmaxStats = 9,
};

// The `params` (float[]) of the softmax ops, in this order. (t0, t1) = (scale, margin) for the
// margin heads and (gamma, m) for class-level Circle.
enum SoftmaxParam : int64_t {
  kPLogEnd = 0,
  kPRho = 1,  // bonus_weight
  kPSmooth = 2,
  kPEps = 3,
  kPT0 = 4,
  kPT1 = 5,
  kNumSoftmaxParams = 6,
};

// The `pool` argument of pooled_linear_softmax_loss: how the K similarities of a class's K
// centers (weight rows c K .. c K + K - 1) become the class's value before the logit transform.
enum SoftmaxPool : int64_t {
  kPoolMax = 0,      // max_k s_ck (SubCenterArcFace); the gradient goes to the first maximum
  kPoolSoftAvg = 1,  // sum_k softmax_k(g s_ck) s_ck, g = pool_param (SoftTriple's 1 / gamma)
  kNumSoftmaxPools = 2,
};

// Columns of proxy_anchor_loss's per-class statistics (C x kNumProxyAnchorStats).
enum ProxyAnchorStat : int64_t {
  kPaPosTerm = 0,  // log(1 + sum_{i: y_i = c} exp(-alpha (s_ic - margin))), 0 without such rows
  kPaNegTerm = 1,  // log(1 + sum_{i: y_i != c} exp(alpha (s_ic + margin))), 0 without such rows
  kPaNumPos = 2,   // rows of class c
  kPaNumNeg = 3,   // rows of another class
  kNumProxyAnchorStats = 4,
};

// ---- taskmet family (conjugate gradients) ----

// The per-column `status` output of cg_dense / cg_update (uint8).
enum CGStatus : uint8_t {
  kRunning = 0,
  kConverged = 1,
  kNegativeCurvature = 2,
  kBreakdown = 3,
  kNumCGStatus = 4,
};

}  // namespace structloss_fast
