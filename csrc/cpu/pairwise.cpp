// CPU epilogue of the fused pairwise engine: turns a T x M similarity strip into per-anchor
// statistics and the gradient dl/ds, row by row, in parallel over rows. Each row is walked a
// few times while it is hot in L1/L2; the loops are written to auto-vectorize inside the AVX2
// clone of the multiversioned functions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/pairwise_driver.h"
#include "../common/pairwise_math.h"

namespace structloss_fast {
namespace {

// Per-thread scratch rows.
template <typename T>
struct Scratch {
  std::vector<T> a, b, c, d;
  std::vector<int64_t> ia, ib;
  std::vector<double> prefix;
  std::vector<T> bins;  // FastAP's histograms and their cumulative sums
  explicit Scratch(int64_t M) : a(M), b(M) {}
  void ensure_bins(int64_t edges) {
    if (static_cast<int64_t>(bins.size()) < 5 * edges) bins.resize(5 * edges);
  }
  void ensure_triplet(int64_t M) {
    if (static_cast<int64_t>(c.size()) < M) {
      c.resize(M);
      d.resize(M);
      ia.resize(M);
      ib.resize(M);
      prefix.resize(M + 1);
    }
  }
};

// One anchor row of a strip: pair values in s (PairValue), gradient out in s.
template <typename T, typename L>
struct Row {
  T* s;
  int64_t M;
  const L* lab;
  L li;
  int64_t self_j;
  T ni;           // the anchor's squared norm, and
  const T* nref;  // the references' (for distances computed from g)
  T* stats;       // this anchor's kNumPairStats statistics
};

// The row functions read a Row's fields into locals (s, M, lab, li, self_j, ni, nref) before
// their loops: stores through the row pointers could alias the struct's fields as far as the
// compiler knows, which keeps it from vectorizing the loops.
#define SLF_ROW_LOCALS(r)                           \
  T* const s = (r).s;                               \
  const int64_t M = (r).M;                          \
  [[maybe_unused]] const L* const lab = (r).lab;    \
  [[maybe_unused]] const L li = (r).li;             \
  [[maybe_unused]] const int64_t self_j = (r).self_j; \
  [[maybe_unused]] const T ni = (r).ni;             \
  [[maybe_unused]] const T* const nref = (r).nref

// A distance loss's d_j: the strip's value (direct) or computed from g.
#define SLF_DIST(j) (direct ? s[j] : pair_distance(s[j], ni, nref[j]))

// The keep window of a fused pair miner for this anchor (pair_window); for multi-similarity
// the extremes of u = sigma * v over the candidates come first. `direct`: see SLF_DIST
// (similarity losses pass true: they read the strip as it is).
template <typename T, typename L>
SLF_HD PairWindow<T> row_window(const Row<T, L> r, const PairwiseSpec& spec, T sigma, bool direct) {
  if (spec.miner != kMinerMultiSimilarity) return pair_window(spec, sigma, T(0), T(0));
  SLF_ROW_LOCALS(r);
  const int64_t skip = spec.miner_sees_self() ? -1 : self_j;
  T max_nu = neg_inf<T>(), max_pu = neg_inf<T>();
#pragma omp simd reduction(max : max_nu, max_pu)
  for (int64_t j = 0; j < M; ++j) {
    const T u = sigma * SLF_DIST(j);
    const bool same = lab[j] == li;
    const T vn = same ? neg_inf<T>() : u;
    const T vp = (same && j != skip) ? -u : neg_inf<T>();
    max_nu = max_nu > vn ? max_nu : vn;  // canonical max form, see twoset_forward
    max_pu = max_pu > vp ? max_pu : vp;
  }
  return pair_window(spec, sigma, max_nu, max_pu);
}

// ---------------------------------------------------------------- two-set losses

// The pairs of anchor i: positives (same label, not i itself) and negatives, each kept by the
// fused miner's window `win` (all kept without a miner).
template <typename T, typename Logits, typename Combine>
struct TwoSet {
  const Logits& lg;
  const Combine& combine;
  bool row_counted;
  PairWindow<T> win;
};

template <typename T, typename L, typename Logits, typename Combine>
SLF_HD void twoset_forward(const Row<T, L> r, T* buf, const TwoSet<T, Logits, Combine>& ts, bool want_grad) {
  SLF_ROW_LOCALS(r);
  const Logits& lg = ts.lg;
  const PairWindow<T> win = ts.win;
  T max_p = neg_inf<T>(), max_n = neg_inf<T>();
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(max : max_p, max_n) reduction(+ : cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j && win.pos(sj);
    const bool neg = !same && win.neg(sj);
    const T a = same ? lg.pos(sj) : lg.neg(sj);
    buf[j] = a;
    // Masked maxima in the canonical `m = m > v ? m : v` form: GCC 12 miscompiles the
    // conditional-update form `m = (c && a > m) ? a : m` of an omp-simd max reduction in
    // AVX2 code for double (the maximum comes out as 0; caught by the huge-scale tests).
    const T v_pos = pos ? a : neg_inf<T>();
    const T v_neg = neg ? a : neg_inf<T>();
    max_p = max_p > v_pos ? max_p : v_pos;
    max_n = max_n > v_neg ? max_n : v_neg;
    cnt_p += pos ? 1 : 0;
    cnt_n += neg ? 1 : 0;
  }
  // A NaN logit makes the maximum NaN, and so the sums below and the loss.
  T sum_p = T(0), sum_n = T(0);
#pragma omp simd reduction(+ : sum_p, sum_n)
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j && win.pos(sj);
    const bool neg = !same && win.neg(sj);
    const T e = exp_fast(buf[j] - (same ? max_p : max_n));
    buf[j] = (pos || neg) ? e : T(0);
    sum_p += pos ? e : T(0);
    sum_n += neg ? e : T(0);
  }
  const T lse_p = cnt_p > 0 ? max_p + log_(sum_p) : neg_inf<T>();
  const T lse_n = cnt_n > 0 ? max_n + log_(sum_n) : neg_inf<T>();
  const TwoSetResult<T> res = ts.combine(lse_p, lse_n, cnt_p > 0, cnt_n > 0);
  const bool counts = ts.row_counted ? row_counts(res.loss) : true;
  T* st = r.stats;
  st[kPairAux0] = lse_p;
  st[kPairAux1] = lse_n;
  st[kPairSum0] = res.loss;
  st[kPairCount0] = counts ? T(1) : T(0);
  st[kPairNumPos] = static_cast<T>(cnt_p);
  st[kPairNumNeg] = static_cast<T>(cnt_n);
  if (!want_grad) return;
  if (!counts) {
    std::fill(s, s + M, T(0));
    return;
  }
  const T c_p = cnt_p > 0 ? res.dlse_pos / sum_p : T(0);
  const T c_n = cnt_n > 0 ? res.dlse_neg / sum_n : T(0);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const T coef = same ? c_p * lg.pos_grad(sj) : c_n * lg.neg_grad(sj);
    s[j] = coef * buf[j];  // buf is 0 outside the two sets
  }
}

template <typename T, typename L, typename Logits, typename Combine>
SLF_HD void twoset_backward(const Row<T, L> r, const TwoSet<T, Logits, Combine>& ts, T w) {
  SLF_ROW_LOCALS(r);
  const Logits& lg = ts.lg;
  const PairWindow<T> win = ts.win;
  const T* st = r.stats;
  const T lse_p = st[kPairAux0], lse_n = st[kPairAux1];
  if (w == T(0) || (ts.row_counted && st[kPairCount0] == T(0))) {
    std::fill(s, s + M, T(0));
    return;
  }
  const TwoSetResult<T> res = ts.combine(lse_p, lse_n, st[kPairNumPos] > 0, st[kPairNumNeg] > 0);
  const T c_p = w * res.dlse_pos, c_n = w * res.dlse_neg;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j && win.pos(sj);
    const bool neg = !same && win.neg(sj);
    const T a = same ? lg.pos(sj) - lse_p : lg.neg(sj) - lse_n;
    const T da = same ? c_p * lg.pos_grad(sj) : c_n * lg.neg_grad(sj);
    s[j] = (pos || neg) ? da * exp_fast(a) : T(0);
  }
}

// ---------------------------------------------------------------- SupCon

// l = LSE_{P u N} a - mean_P a, a = s / t; 0 without positives.
template <typename T, typename L>
SLF_HD void supcon_forward(const Row<T, L> r, T* buf, T inv_t, bool want_grad) {
  SLF_ROW_LOCALS(r);
  T mx = neg_inf<T>(), sum_pa = T(0);
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(max : mx) reduction(+ : sum_pa, cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T a = s[j] * inv_t;
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const bool in_set = pos || !same;
    const T v = in_set ? a : neg_inf<T>();
    mx = mx > v ? mx : v;  // canonical max form, see twoset_forward
    sum_pa += pos ? a : T(0);
    cnt_p += pos ? 1 : 0;
    cnt_n += same ? 0 : 1;
  }
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool in_set = !same || j != self_j;
    const T e = exp_fast(s[j] * inv_t - mx);
    buf[j] = in_set ? e : T(0);
    sum += in_set ? e : T(0);
  }
  const int64_t n_set = cnt_p + cnt_n;
  const T lse = n_set > 0 ? mx + log_(sum) : neg_inf<T>();
  const T mean_p = cnt_p > 0 ? sum_pa / static_cast<T>(cnt_p) : T(0);
  const T loss = cnt_p > 0 ? lse - mean_p : T(0);
  const bool counts = row_counts(loss);
  T* st = r.stats;
  st[kPairAux0] = lse;
  st[kPairAux1] = mean_p;
  st[kPairSum0] = loss;
  st[kPairCount0] = counts ? T(1) : T(0);
  st[kPairNumPos] = static_cast<T>(cnt_p);
  st[kPairNumNeg] = static_cast<T>(cnt_n);
  if (!want_grad) return;
  if (!counts) {
    std::fill(s, s + M, T(0));
    return;
  }
  const T c_set = inv_t / sum, c_pos = inv_t / static_cast<T>(cnt_p);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    s[j] = c_set * buf[j] - (pos ? c_pos : T(0));
  }
}

template <typename T, typename L>
SLF_HD void supcon_backward(const Row<T, L> r, T inv_t, T w) {
  SLF_ROW_LOCALS(r);
  const T* st = r.stats;
  if (w == T(0) || st[kPairCount0] == T(0)) {
    std::fill(s, s + M, T(0));
    return;
  }
  const T lse = st[kPairAux0];
  const T c_set = w * inv_t, c_pos = w * inv_t / st[kPairNumPos];
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const bool in_set = pos || !same;
    const T g = c_set * exp_fast(s[j] * inv_t - lse) - (pos ? c_pos : T(0));
    s[j] = in_set ? g : T(0);
  }
}

// ---------------------------------------------------------------- NT-Xent, tuplet margin

// Writes w * dl/ds: positives -w a_pos' sigmoid(LSE_N - a_pos), negatives w c a_neg' e^{a_neg - LSE_N}
// with c = sum_p sigmoid(LSE_N - a_pos) (one exp per pair).
template <typename T, typename L, typename Logits>
SLF_HD void perpos_grad(const Row<T, L> r, const Logits& lg, T lse_n, T c, T w) {
  SLF_ROW_LOCALS(r);
  const T c_n = w * c;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const T e = exp_fast((same ? lg.pos(sj) : lg.neg(sj)) - lse_n);
    const T g_pos = j != self_j ? -w * lg.pos_grad(sj) / (T(1) + e) : T(0);
    s[j] = same ? g_pos : c_n * e * lg.neg_grad(sj);
  }
}

// l = sum_{p in P} softplus(LSE_N a_neg - a_pos(s_p)), the logits given by lg (NTXentLogits:
// a = s / t; TupletLogits: positives scale cos(theta - margin), negatives scale s).
template <typename T, typename L, typename Logits>
SLF_HD void perpos_forward(const Row<T, L> r, const Logits& lg, bool want_grad) {
  SLF_ROW_LOCALS(r);
  T max_n = neg_inf<T>();
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(max : max_n) reduction(+ : cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const T v = same ? neg_inf<T>() : lg.neg(s[j]);
    max_n = max_n > v ? max_n : v;  // canonical max form, see twoset_forward
    cnt_p += (same && j != self_j) ? 1 : 0;
    cnt_n += same ? 0 : 1;
  }
  T sum_n = T(0);
#pragma omp simd reduction(+ : sum_n)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const T e = exp_fast(lg.neg(s[j]) - max_n);
    sum_n += same ? T(0) : e;
  }
  const T lse_n = cnt_n > 0 ? max_n + log_(sum_n) : neg_inf<T>();
  // Positives are few: a plain loop.
  T loss = T(0), c = T(0);
  for (int64_t j = 0; j < M; ++j) {
    if (lab[j] == li && j != self_j) {
      const T z = lse_n - lg.pos(s[j]);
      loss += softplus_exact(z);
      c += sigmoid(z);
    }
  }
  T* st = r.stats;
  st[kPairAux0] = lse_n;
  st[kPairAux1] = c;
  st[kPairSum0] = loss;
  st[kPairCount0] = static_cast<T>(cnt_p);
  st[kPairNumPos] = static_cast<T>(cnt_p);
  st[kPairNumNeg] = static_cast<T>(cnt_n);
  if (!want_grad) return;
  perpos_grad(r, lg, lse_n, c, T(1));
}

template <typename T, typename L, typename Logits>
SLF_HD void perpos_backward(const Row<T, L> r, const Logits& lg, T w) {
  if (w == T(0)) {
    std::fill(r.s, r.s + r.M, T(0));
    return;
  }
  perpos_grad(r, lg, r.stats[kPairAux0], r.stats[kPairAux1], w);
}

// ---------------------------------------------------------------- contrastive

// Terms: sum_P relu(d - pos_margin) and sum_N relu(neg_margin - d), d = ||x^ - r^||.
// With want_grad, also overwrites the strip with the unit-weight gradient in the same pass:
// term 0's entries (positives) come out <= 0 and term 1's (negatives) >= 0; the driver splits
// them by sign and scales each by its own reduction factor.
template <typename T, typename L>
SLF_HD void contrastive_forward(const Row<T, L> r, T pos_margin, T neg_margin, bool direct, const PairWindow<T> win,
                                bool want_grad) {
  SLF_ROW_LOCALS(r);
  T sum_p = T(0), sum_n = T(0), nz_p = T(0), nz_n = T(0);
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(+ : sum_p, sum_n, nz_p, nz_n, cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T d = SLF_DIST(j);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j && win.pos(d);
    const bool neg = !same && win.neg(d);
    const T lp = relu(d - pos_margin), ln = relu(neg_margin - d);
    sum_p += pos ? lp : T(0);
    sum_n += neg ? ln : T(0);
    nz_p += (pos && row_counts(lp)) ? T(1) : T(0);
    nz_n += (neg && row_counts(ln)) ? T(1) : T(0);
    cnt_p += pos ? 1 : 0;
    cnt_n += neg ? 1 : 0;
    if (want_grad) {  // loop-invariant: unswitched by the compiler
      const T dd = direct ? T(1) : pair_distance_grad(d);
      s[j] = pos ? relu_grad(d - pos_margin) * dd : (neg ? -relu_grad(neg_margin - d) * dd : T(0));
    }
  }
  T* st = r.stats;
  st[kPairSum0] = sum_p;
  st[kPairCount0] = nz_p;
  st[kPairSum1] = sum_n;
  st[kPairCount1] = nz_n;
  st[kPairNumPos] = static_cast<T>(cnt_p);
  st[kPairNumNeg] = static_cast<T>(cnt_n);
}

template <typename T, typename L>
SLF_HD void contrastive_backward(const Row<T, L> r, T pos_margin, T neg_margin, bool direct, const PairWindow<T> win,
                                 T w_pos, T w_neg) {
  SLF_ROW_LOCALS(r);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T d = SLF_DIST(j);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j && win.pos(d);
    const bool neg = !same && win.neg(d);
    const T dd = direct ? T(1) : pair_distance_grad(d);
    const T g_pos = w_pos * relu_grad(d - pos_margin) * dd;
    const T g_neg = -w_neg * relu_grad(neg_margin - d) * dd;
    s[j] = pos ? g_pos : (neg ? g_neg : T(0));
  }
}

// ---------------------------------------------------------------- triplet, all triplets

// Loss of anchor i: sum over positives p and negatives n of relu(d_p - d_n + margin); count:
// the triplets with a non-zero loss. d/d d_p = w * #{n active}, d/d d_n = -w * #{p active}.
// With a fused TripletMarginMiner (kMinerTripletWindow), only the triplets whose margin
// d_n - d_p (= u_ap - u_an) lies in (lo, hi] take part; the row's AUX0 is the number of its
// triplets (all or mined: what PML's MeanReducer divides by). With few positives every
// positive sweeps the negatives (vectorized); with many, both sets are sorted and counted by
// binary search (O(M log M)).
template <typename T, typename L>
void triplet_all_row(const Row<T, L> r, Scratch<T>& sc, const PairwiseSpec& spec, bool want_stats, bool want_grad,
                     T w) {
  SLF_ROW_LOCALS(r);
  const T margin = static_cast<T>(spec.p[0]);
  const bool direct = spec.direct();
  const bool windowed = spec.miner == kMinerTripletWindow;
  const T lo = windowed ? static_cast<T>(spec.mp[0]) : neg_inf<T>();
  const T hi = windowed ? static_cast<T>(spec.mp[1]) : static_cast<T>(INFINITY);
  sc.ensure_triplet(M);
  T* dp = sc.a.data();
  T* dn = sc.b.data();
  int64_t* ip = sc.ia.data();
  int64_t* in = sc.ib.data();
  int64_t np = 0, nn = 0;
  bool has_nan = false;
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const T d = SLF_DIST(j);
    has_nan |= d != d && (!same || j != self_j);
    if (same) {
      if (j != self_j) {
        dp[np] = d;
        ip[np++] = j;
      }
    } else {
      dn[nn] = d;
      in[nn++] = j;
    }
  }
  T* kp = sc.c.data();    // per positive: active negatives
  T* cntn = sc.d.data();  // per negative: active positives
  T loss = T(0), count = T(0), triplets = T(0);
  if (np > 0 && nn > 0 && !has_nan) {
    if (np <= 16) {
      std::fill(cntn, cntn + nn, T(0));
      for (int64_t p = 0; p < np; ++p) {
        const T dpv = dp[p];
        T sum = T(0), k = T(0), kept_n = T(0);
#pragma omp simd reduction(+ : sum, k, kept_n)
        for (int64_t n = 0; n < nn; ++n) {
          const T t = (dpv - dn[n]) + margin;
          const T tm = dn[n] - dpv;  // PML's an - ap, exactly
          const bool kept = !(tm <= lo) && !(tm > hi);
          const bool active = kept && t > T(0);
          sum += active ? t : T(0);
          k += active ? T(1) : T(0);
          kept_n += kept ? T(1) : T(0);
          cntn[n] += active ? T(1) : T(0);
        }
        loss += sum;
        count += k;
        triplets += kept_n;
        kp[p] = k;
      }
    } else {
      // Sorted negatives with prefix sums answer "how many, and which sum, in a range"; the
      // window's bounds become ranges of d_n (d_p + lo, d_p + hi].
      std::vector<T> sorted_n(dn, dn + nn), sorted_p(dp, dp + np);
      std::sort(sorted_n.begin(), sorted_n.end());
      std::sort(sorted_p.begin(), sorted_p.end());
      double* prefix = sc.prefix.data();
      prefix[0] = 0.0;
      for (int64_t n = 0; n < nn; ++n) prefix[n + 1] = prefix[n] + static_cast<double>(sorted_n[n]);
      const auto first_above = [&](const std::vector<T>& v, T x) {  // first index with v > x
        return std::upper_bound(v.begin(), v.end(), x) - v.begin();
      };
      const auto first_at_least = [&](const std::vector<T>& v, T x) {  // first index with v >= x
        return std::lower_bound(v.begin(), v.end(), x) - v.begin();
      };
      double loss_d = 0.0;
      for (int64_t p = 0; p < np; ++p) {
        const T thr = dp[p] + margin;
        const int64_t start = windowed ? first_above(sorted_n, dp[p] + lo) : 0;
        const int64_t end_kept = windowed ? first_above(sorted_n, dp[p] + hi) : nn;
        const int64_t end = std::max(start, std::min(end_kept, first_at_least(sorted_n, thr)));
        const int64_t k = end - start;
        loss_d += static_cast<double>(k) * static_cast<double>(thr) - (prefix[end] - prefix[start]);
        count += static_cast<T>(k);
        triplets += static_cast<T>(std::max<int64_t>(end_kept - start, 0));
        kp[p] = static_cast<T>(k);
      }
      loss = static_cast<T>(loss_d);
      for (int64_t n = 0; n < nn; ++n) {
        // Positives with d_p > d_n - margin (active), d_p >= d_n - hi and d_p < d_n - lo (kept).
        int64_t start = first_above(sorted_p, dn[n] - margin);
        int64_t end = np;
        if (windowed) {
          start = std::max<int64_t>(start, first_at_least(sorted_p, dn[n] - hi));
          end = first_at_least(sorted_p, dn[n] - lo);
        }
        cntn[n] = static_cast<T>(std::max<int64_t>(end - start, 0));
      }
    }
  }
  if (has_nan) {
    loss = std::numeric_limits<T>::quiet_NaN();
    count = T(1);
    triplets = static_cast<T>(np * nn);
  }
  if (want_stats) {
    T* st = r.stats;
    st[kPairAux0] = triplets;
    st[kPairSum0] = loss;
    st[kPairCount0] = count;
    st[kPairNumPos] = static_cast<T>(np);
    st[kPairNumNeg] = static_cast<T>(nn);
  }
  if (!want_grad) return;
  const T fill = has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
  const T dd_direct = T(1);
  std::fill(s, s + M, T(0));
  if (w == T(0) || np == 0 || nn == 0) return;
  for (int64_t p = 0; p < np; ++p) {
    s[ip[p]] = has_nan ? fill : w * kp[p] * (direct ? dd_direct : pair_distance_grad(dp[p]));
  }
  for (int64_t n = 0; n < nn; ++n) {
    s[in[n]] = has_nan ? fill : -w * cntn[n] * (direct ? dd_direct : pair_distance_grad(dn[n]));
  }
}

// ---------------------------------------------------------------- triplet, one triplet per anchor

// The first candidate j (in `cand`) whose value in d is the largest (want_max) or smallest, or
// -1 without a candidate. The candidates' values are written to tmp first, so that the reduction
// is a plain max / min over an array (the canonical form; see twoset_forward).
template <typename T, typename Cand>
SLF_HD int64_t first_extreme(const T* d, T* tmp, int64_t M, bool want_max, const Cand& cand) {
  const T fill = want_max ? neg_inf<T>() : static_cast<T>(INFINITY);
  int64_t n = 0;
#pragma omp simd reduction(+ : n)
  for (int64_t j = 0; j < M; ++j) {
    const bool c = cand(j);
    tmp[j] = c ? d[j] : fill;
    n += c ? 1 : 0;
  }
  if (n == 0) return -1;
  T best = fill;
  if (want_max) {
#pragma omp simd reduction(max : best)
    for (int64_t j = 0; j < M; ++j) best = best > tmp[j] ? best : tmp[j];
  } else {
#pragma omp simd reduction(min : best)
    for (int64_t j = 0; j < M; ++j) best = best < tmp[j] ? best : tmp[j];
  }
  for (int64_t j = 0; j < M; ++j) {
    if (tmp[j] == best && cand(j)) return j;
  }
  return -1;  // only infinite or NaN candidates: no pick
}

// One triplet (anchor, p*, n*) per anchor, relu(d_p* - d_n* + margin), for anchors that have
// both picks. Without a fused miner, p* is the hardest positive (largest d, first on ties) and
// n* the hardest negative (smallest d): PML's BatchHardMiner. With kMinerEasyHard the picks
// follow PML's BatchEasyHardMiner (PairPick: hard, easy, or semihard relative to the other
// pick, taken first); the anchor's own memory slot is then a positive candidate
// (miner_sees_self) whose triplet is dropped, as PML's CrossBatchMemory removes it.
template <typename T, typename L>
SLF_HD void triplet_hard_row(const Row<T, L> r, T* buf, T* tmp, const PairwiseSpec& spec, bool want_stats,
                             bool want_grad, T w) {
  SLF_ROW_LOCALS(r);
  const T margin = static_cast<T>(spec.p[0]);
  const bool direct = spec.direct();
  const bool mined = spec.miner == kMinerEasyHard;
  const int64_t pick_p = mined ? static_cast<int64_t>(spec.mp[0]) : kPickHard;
  const int64_t pick_n = mined ? static_cast<int64_t>(spec.mp[1]) : kPickHard;
  const int64_t skip = (mined && spec.miner_sees_self()) ? -1 : self_j;
  int64_t np = 0, nn = 0, n_nan = 0;
#pragma omp simd reduction(+ : np, nn, n_nan)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T d = SLF_DIST(j);
    buf[j] = d;
    np += pos ? 1 : 0;
    nn += same ? 0 : 1;
    n_nan += ((pos || !same) && d != d) ? 1 : 0;
  }
  // Picks on the distance d: a hard positive is the farthest, a hard negative the nearest.
  const auto pos_pick = [&](T bound) {  // bound: semihard positives are nearer than it
    return first_extreme(buf, tmp, M, pick_p != kPickEasy, [&](int64_t j) {
      return lab[j] == li && j != skip && (pick_p != kPickSemihard || buf[j] < bound);
    });
  };
  const auto neg_pick = [&](T bound) {  // bound: semihard negatives are farther than it
    return first_extreme(buf, tmp, M, pick_n == kPickEasy, [&](int64_t j) {
      return lab[j] != li && (pick_n != kPickSemihard || buf[j] > bound);
    });
  };
  int64_t jp, jn;
  if (pick_p == kPickSemihard) {
    jn = neg_pick(T(0));
    jp = jn >= 0 ? pos_pick(buf[jn]) : -1;
  } else {
    jp = pos_pick(T(0));
    jn = jp >= 0 || pick_n != kPickSemihard ? neg_pick(jp >= 0 ? buf[jp] : T(0)) : -1;
  }
  // A NaN distance among an anchor's pairs: the picks are undefined and the loss is NaN.
  const bool nan_row = n_nan > 0 && np > 0 && nn > 0;
  const bool picked = jp >= 0 && jn >= 0 && jp != self_j && !nan_row;
  const bool valid = picked || nan_row;
  const T best_p = picked ? buf[jp] : T(0), best_n = picked ? buf[jn] : T(0);
  const T loss = nan_row ? std::numeric_limits<T>::quiet_NaN() : (picked ? relu((best_p - best_n) + margin) : T(0));
  const bool counts = valid && row_counts(loss);
  if (want_stats) {
    T* st = r.stats;
    st[kPairAux0] = static_cast<T>(picked ? jp : -1);
    st[kPairAux1] = static_cast<T>(picked ? jn : -1);
    st[kPairSum0] = loss;
    st[kPairCount0] = counts ? T(1) : T(0);
    st[kPairNumPos] = mined ? T(valid ? 1 : 0) : static_cast<T>(np);
    st[kPairNumNeg] = mined ? T(valid ? 1 : 0) : static_cast<T>(nn);
  }
  if (!want_grad) return;
  std::fill(s, s + M, T(0));
  if (!counts || w == T(0)) return;
  if (nan_row) {
    std::fill(s, s + M, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const T g = w * relu_grad(loss);
  s[jp] = g * (direct ? T(1) : pair_distance_grad(best_p));
  s[jn] = -g * (direct ? T(1) : pair_distance_grad(best_n));
}

// ---------------------------------------------------------------- margin loss, all triplets

// Wu et al.'s margin loss over every triplet (a, p, n) of anchor a: relu(d_p - beta + margin) +
// relu(beta - d_n + margin). Each positive's term recurs once per negative and vice versa, so
// the anchor's sum is |N| sum_P relu(d_p - beta + margin) + |P| sum_N relu(beta - d_n + margin),
// its count the non-zero parts counted the same way (a NaN part makes the sum NaN instead of
// being counted), and aux0 the derivative of the sum in beta (the anchor's own parameter).
template <typename T, typename L>
SLF_HD void margin_row(const Row<T, L> r, T margin, T beta, bool want_stats, bool want_grad, T w) {
  SLF_ROW_LOCALS(r);
  // Written with "active" booleans rather than relu / row_counts / relu_grad: in that form GCC's
  // vectorizer gave up on the loop, and with 0/1 factors (ip * lp) GCC 12 miscompiles the double
  // version of the counts. A NaN part is carried into the sums explicitly, and the derivative in
  // beta is made NaN with it below. Counters in T, for the same reason.
  T sum_p = T(0), sum_n = T(0), on_p = T(0), on_n = T(0), cnt_p = T(0), cnt_n = T(0);
#pragma omp simd reduction(+ : sum_p, sum_n, on_p, on_n, cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T d = unit_distance(s[j]);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T lp = (d - beta) + margin, ln = (beta - d) + margin;
    const bool ap = pos && lp > T(0), an = !same && ln > T(0);
    sum_p += ap ? lp : ((pos && lp != lp) ? lp : T(0));
    sum_n += an ? ln : ((!same && ln != ln) ? ln : T(0));
    on_p += ap ? T(1) : T(0);
    on_n += an ? T(1) : T(0);
    cnt_p += pos ? T(1) : T(0);
    cnt_n += same ? T(0) : T(1);
  }
  const bool any = cnt_p > T(0) && cnt_n > T(0);  // an anchor without triplets contributes nothing
  const T np = cnt_p, nn = cnt_n;
  const T term = nn * sum_p + np * sum_n;
  if (want_stats) {
    T* st = r.stats;
    const T dbeta = np * on_n - nn * on_p;
    st[kPairAux0] = any ? (term != term ? term : dbeta) : T(0);
    st[kPairSum0] = any ? term : T(0);
    st[kPairCount0] = any ? nn * on_p + np * on_n : T(0);
    st[kPairNumPos] = np;
    st[kPairNumNeg] = nn;
  }
  if (!want_grad) return;
  const T wp = any ? w * nn : T(0), wn = any ? -w * np : T(0);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T d = unit_distance(s[j]);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T dd = pair_distance_grad(d);  // NaN for a NaN distance, and relu_grad keeps it
    const T g_pos = wp * relu_grad((d - beta) + margin) * dd;
    const T g_neg = wn * relu_grad((beta - d) + margin) * dd;
    s[j] = same ? (pos ? g_pos : T(0)) : g_neg;
  }
}

// ---------------------------------------------------------------- FastAP

// The loops of a FastAP row, each in a small function of plain pointers: inside fastap_row GCC
// left them scalar. Counts in T for the same reason.
template <typename T, typename L>
SLF_CPU_MULTIVERSION void fastap_sq_distances(const T* s, const L* lab, L li, int64_t self_j, int64_t M, T* d2,
                                              T* counts) {
  T cnt_p = T(0), cnt_n = T(0), n_nan = T(0);
#pragma omp simd reduction(+ : cnt_p, cnt_n, n_nan)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T v = unit_sq_distance(s[j]);
    d2[j] = v;
    cnt_p += pos ? T(1) : T(0);
    cnt_n += same ? T(0) : T(1);
    n_nan += ((pos || !same) && v != v) ? T(1) : T(0);
  }
  counts[0] = cnt_p;
  counts[1] = cnt_n;
  counts[2] = n_nan;
}

template <typename T, typename L>
SLF_CPU_MULTIVERSION void fastap_histograms(const T* d2, const L* lab, L li, int64_t M, const FastApBins<T>& bins,
                                            const T* centers, T* ha, T* hb) {
  for (int64_t k = 0; k < bins.edges; ++k) {
    const T c = centers[k];
    T a = T(0), b = T(0);
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < M; ++j) {
      const bool same = lab[j] == li;
      const T pl = bins.pulse(d2[j], c);
      a += same ? pl : T(0);
      b += same ? T(0) : pl;
    }
    ha[k] = a;
    hb[k] = b;
  }
}

// g_j = sum_k (dl/da_k or dl/db_k) d pulse_k / d d2_j, times d d2 / ds.
template <typename T, typename L>
SLF_CPU_MULTIVERSION void fastap_spread(const T* d2, const L* lab, L li, int64_t M, const FastApBins<T>& bins,
                                        const T* centers, const T* ca, const T* cb, T* g, T* s) {
  std::fill(g, g + M, T(0));
  for (int64_t k = 0; k < bins.edges; ++k) {
    const T c = centers[k], a = ca[k], b = cb[k];
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) g[j] += (lab[j] == li ? a : b) * bins.pulse_grad(d2[j], c);
  }
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) s[j] = g[j] * (d2[j] > T(0) ? T(-2) : T(0));
}

// Cakir et al.'s FastAP with PML's histogram: squared distances d2 in [0, 4] binned by
// triangular pulses at edges = num_bins + 1 centers; per anchor the positives' histogram a_k and
// the negatives' b_k, their cumulative sums A_k and T_k = sum_{l <= k} (a_l + b_l), and
// FastAP = (1 / |P|) sum_k a_k A_k / T_k over the bins where a_k A_k > 0 and T_k > 0 (only those
// carry gradient, as in PML). The row loss is 1 - FastAP (counted) for anchors with positives.
template <typename T, typename L>
void fastap_row(const Row<T, L> r, Scratch<T>& sc, const FastApBins<T>& bins, bool want_stats, bool want_grad, T w) {
  SLF_ROW_LOCALS(r);
  const int64_t E = bins.edges;
  sc.ensure_bins(E);
  T* d2 = sc.a.data();
  T* ha = sc.bins.data();  // a_k, then dl/da_k
  T* hb = ha + E;          // b_k, then dl/db_k
  T* cum_a = hb + E;
  T* cum_t = cum_a + E;
  // The centers outside the loops: FastApBins::center's branch split the bin loop in two and
  // left one half scalar.
  T* centers = cum_t + E;
  for (int64_t k = 0; k < E; ++k) centers[k] = bins.center(k);
  T counts[3];
  fastap_sq_distances(s, lab, li, self_j, M, d2, counts);
  const T cnt_p = counts[0], cnt_n = counts[1], n_nan = counts[2];
  // The anchor's own column, when its label is the anchor's (not a positive, not a negative),
  // gets d2 = inf: no bin's pulse reaches it (nor its derivative), so the loops need not test
  // for it. (With another label it is a negative, as in every loss.)
  if (self_j >= 0 && self_j < M && lab[self_j] == li) d2[self_j] = static_cast<T>(INFINITY);
  fastap_histograms(d2, lab, li, M, bins, centers, ha, hb);
  // F and, by suffix sums over the safe bins, dF/da_k = [safe_k] A_k / T_k + sum_{l >= k, safe}
  // (a_l / T_l - a_l A_l / T_l^2) and dF/db_k = -sum_{l >= k, safe} a_l A_l / T_l^2.
  T A = T(0), Tt = T(0), F = T(0);
  for (int64_t k = 0; k < E; ++k) {
    A += ha[k];
    Tt += ha[k] + hb[k];
    cum_a[k] = A;
    cum_t[k] = Tt;
    if (ha[k] * A > T(0) && Tt > T(0)) F += ha[k] * A / Tt;
  }
  const T np = cnt_p;
  const bool has_pos = cnt_p > T(0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  T loss = has_pos ? T(1) - F / np : T(0);
  if (has_pos && n_nan > T(0)) loss = nan;
  if (want_stats) {
    T* st = r.stats;
    st[kPairSum0] = loss;
    st[kPairCount0] = has_pos ? T(1) : T(0);
    st[kPairNumPos] = np;
    st[kPairNumNeg] = cnt_n;
  }
  if (!want_grad) return;
  if (!has_pos || w == T(0)) {
    std::fill(s, s + M, T(0));
    return;
  }
  if (n_nan > T(0)) {
    std::fill(s, s + M, nan);
    return;
  }
  T R = T(0), Q = T(0);
  for (int64_t k = E - 1; k >= 0; --k) {
    const bool safe = ha[k] * cum_a[k] > T(0) && cum_t[k] > T(0);
    const T a = ha[k], Ak = cum_a[k], Tk = cum_t[k];
    if (safe) {
      R += a / Tk - a * Ak / (Tk * Tk);
      Q += a * Ak / (Tk * Tk);
    }
    ha[k] = -w * ((safe ? Ak / Tk : T(0)) + R) / np;  // dl/da_k
    hb[k] = w * Q / np;                                // dl/db_k
  }
  fastap_spread(d2, lab, li, M, bins, centers, ha, hb, sc.b.data(), s);
}

// ---------------------------------------------------------------- dispatch over rows

template <typename T, typename L>
struct StripArgs {
  T* S;
  int64_t M;
  int64_t row0;
  const L* labels;
  const L* ref_labels;
  const PairwiseSpec* spec;
  const T* x_sq;     // (B,) squared norms
  const T* ref_sq;   // (M,)
  T* stats;          // (B, kNumPairStats)
  const T* weights;  // (B, terms); backward only
  bool want_grad;    // forward only
  bool backward;
};

template <typename T, typename L>
Row<T, L> row_at(const StripArgs<T, L>& a, int64_t r) {
  const int64_t i = a.row0 + r;
  return Row<T, L>{a.S + r * a.M, a.M, a.ref_labels, a.labels[i], self_column(*a.spec, i, a.M), a.x_sq[i], a.ref_sq,
                   a.stats + i * kNumPairStats};
}

template <typename T, typename L, typename Logits, typename Combine>
SLF_CPU_MULTIVERSION void twoset_rows(const StripArgs<T, L>& a, const Logits& lg, const Combine& combine,
                                      bool row_counted, int64_t r_begin, int64_t r_end) {
  std::vector<T> buf(a.backward ? 0 : a.M);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Row<T, L> row = row_at(a, r);
    const TwoSet<T, Logits, Combine> ts{lg, combine, row_counted, row_window(row, *a.spec, T(1), true)};
    if (a.backward) {
      twoset_backward(row, ts, a.weights[a.row0 + r]);
    } else {
      twoset_forward(row, buf.data(), ts, a.want_grad);
    }
  }
}

template <typename T, typename L>
SLF_CPU_MULTIVERSION void other_rows(const StripArgs<T, L>& a, int64_t r_begin, int64_t r_end) {
  const PairwiseSpec& spec = *a.spec;
  const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]);
  Scratch<T> sc(a.M);
  const int64_t terms = spec.terms();
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Row<T, L> row = row_at(a, r);
    const T w0 = a.backward ? a.weights[(a.row0 + r) * terms] : T(1);
    switch (spec.loss) {
      case kSupCon:
        a.backward ? supcon_backward(row, T(1) / p0, w0) : supcon_forward(row, sc.a.data(), T(1) / p0, a.want_grad);
        break;
      case kNTXent: {
        const NTXentLogits<T> lg(T(1) / p0);
        a.backward ? perpos_backward(row, lg, w0) : perpos_forward(row, lg, a.want_grad);
        break;
      }
      case kTupletMargin: {
        const TupletLogits<T> lg(spec.p[0], p1);
        a.backward ? perpos_backward(row, lg, w0) : perpos_forward(row, lg, a.want_grad);
        break;
      }
      case kContrastive: {
        const PairWindow<T> win = row_window(row, spec, T(-1), spec.direct());
        if (a.backward) {
          contrastive_backward(row, p0, p1, spec.direct(), win, w0, a.weights[(a.row0 + r) * terms + 1]);
        } else {
          contrastive_forward(row, p0, p1, spec.direct(), win, a.want_grad);
        }
        break;
      }
      case kTripletAll: {
        const bool skip = a.backward && (w0 == T(0));
        if (skip) {
          std::fill(row.s, row.s + row.M, T(0));
        } else {
          triplet_all_row(row, sc, spec, !a.backward, a.backward || a.want_grad, w0);
        }
        break;
      }
      case kTripletHard:
        triplet_hard_row(row, sc.a.data(), sc.b.data(), spec, !a.backward, a.backward || a.want_grad,
                         a.backward && row.stats[kPairCount0] == T(0) ? T(0) : w0);
        break;
      default:
        TORCH_CHECK(false, "structloss_fast: loss ", spec.loss, " has no CPU epilogue");
    }
  }
}

// MarginLoss and FastAP rows in functions of their own: inlined into other_rows' large switch,
// GCC left their loops scalar.
template <typename T, typename L>
SLF_CPU_MULTIVERSION void margin_rows(const StripArgs<T, L>& a, int64_t r_begin, int64_t r_end) {
  const T margin = static_cast<T>(a.spec->p[0]);
  const T* beta = static_cast<const T*>(a.spec->row_params);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Row<T, L> row = row_at(a, r);
    const T w0 = a.backward ? a.weights[a.row0 + r] : T(1);
    if (a.backward && w0 == T(0)) {
      std::fill(row.s, row.s + row.M, T(0));
    } else {
      margin_row(row, margin, beta[a.row0 + r], !a.backward, a.backward || a.want_grad, w0);
    }
  }
}

template <typename T, typename L>
void fastap_rows(const StripArgs<T, L>& a, int64_t r_begin, int64_t r_end) {
  Scratch<T> sc(a.M);
  const FastApBins<T> bins(static_cast<int64_t>(a.spec->p[0]));
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T w0 = a.backward ? a.weights[a.row0 + r] : T(1);
    fastap_row(row_at(a, r), sc, bins, !a.backward, a.backward || a.want_grad, w0);
  }
}

// Rows per parallel task: enough work per task (about 64k pairs) to amortize the scheduling.
int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(M, 1)); }

// The ported distance losses (generalized lifted structure, MarginLoss, FastAP) read the strip
// through unit_distance(s) = sqrt(2 - 2 s). Shifting each value by (2 - n_i - n_j) / 2 makes that
// the distance of the normalized rows themselves, sqrt(n_i + n_j - 2 s) (n = 1, or 0 for a zero
// row: at distance 1 from a unit row, as PML's LpDistance gives); the shift is a constant, so the
// gradient the rows write in s is the gradient in the unshifted value. Normalized non-zero rows
// shift by exactly 0.
template <typename T, typename L>
void shift_to_pair_distances(const StripArgs<T, L>& a, int64_t rows) {
  bool unit_refs = true;
  for (int64_t j = 0; j < a.M && unit_refs; ++j) unit_refs = a.ref_sq[j] == T(1);
  at::parallel_for(0, rows, row_grain(a.M), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Row<T, L> row = row_at(a, r);
      T* const s = row.s;
      const T* const nref = row.nref;
      const T ni = row.ni;
      if (ni == T(1) && unit_refs) continue;
#pragma omp simd
      for (int64_t j = 0; j < row.M; ++j) s[j] += (T(2) - ni - nref[j]) * T(0.5);
    }
  });
}

template <typename T, typename L>
void run_rows(const StripArgs<T, L>& a, int64_t rows) {
  const PairwiseSpec& spec = *a.spec;
  if ((spec.loss == kGenLifted || spec.loss == kMarginAll || spec.loss == kFastAp) && !spec.direct()) {
    shift_to_pair_distances(a, rows);
  }
  auto twoset = [&](const auto& lg, const auto& combine, bool row_counted) {
    at::parallel_for(0, rows, row_grain(a.M),
                     [&](int64_t b, int64_t e) { twoset_rows(a, lg, combine, row_counted, b, e); });
  };
  const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]), p2 = static_cast<T>(spec.p[2]);
  const auto joint = [](T lp, T ln, bool hp, bool hn) { return combine_joint(lp, ln, hp, hn); };
  switch (spec.loss) {
    case kCircle:
      return twoset(CircleLogits<T>(p0, p1), joint, true);
    case kUnified:
      return twoset(UnifiedLogits<T>(p0, p1), joint, true);
    case kMultiSimilarity: {
      const T ia = T(1) / p0, ib = T(1) / p1;
      const auto separate = [ia, ib](T lp, T ln, bool, bool) { return combine_separate(lp, ln, ia, ib); };
      return twoset(MultiSimilarityLogits<T>(p0, p1, p2), separate, false);
    }
    case kGenLifted: {
      const auto relu_of_sum = [](T lp, T ln, bool hp, bool hn) { return combine_relu(lp, ln, hp, hn); };
      return twoset(GenLiftedLogits<T>(p0, p1), relu_of_sum, false);
    }
    case kMarginAll:
      return at::parallel_for(0, rows, row_grain(a.M), [&](int64_t b, int64_t e) { margin_rows(a, b, e); });
    case kFastAp:
      return at::parallel_for(0, rows, row_grain(a.M), [&](int64_t b, int64_t e) { fastap_rows(a, b, e); });
    default:
      at::parallel_for(0, rows, row_grain(a.M), [&](int64_t b, int64_t e) { other_rows(a, b, e); });
  }
}

template <typename Fn>
void dispatch_types(const at::Tensor& S, const at::Tensor& labels, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "structloss_fast_pairwise_cpu", [&] {
    if (labels.scalar_type() == at::kInt) {
      fn(scalar_t(0), int32_t(0));
    } else {
      fn(scalar_t(0), int64_t(0));
    }
  });
}

void cpu_forward(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, bool want_grad,
                 at::Tensor& row_stats) {
  dispatch_types(S, rows.labels, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, rows.labels.data_ptr<L>(), rows.ref_labels.data_ptr<L>(),
                      &spec, rows.x_sq.data_ptr<T>(), rows.ref_sq.data_ptr<T>(), row_stats.data_ptr<T>(), nullptr,
                      want_grad, false};
    run_rows(a, S.size(0));
  });
}

void cpu_backward(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                  const at::Tensor& row_stats, const at::Tensor& row_weights) {
  dispatch_types(S, rows.labels, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, rows.labels.data_ptr<L>(), rows.ref_labels.data_ptr<L>(),
                      &spec, rows.x_sq.data_ptr<T>(), rows.ref_sq.data_ptr<T>(),
                      const_cast<T*>(row_stats.data_ptr<T>()), row_weights.data_ptr<T>(), true, true};
    run_rows(a, S.size(0));
  });
}

// 16 MiB of float32 per strip: large enough for efficient GEMMs, small enough to stay
// far below the memory of a B x B matrix.
constexpr int64_t kCpuStripElems = int64_t(1) << 22;

const PairwiseEpilogue kCpuEpilogue{&cpu_forward, &cpu_backward, kCpuStripElems};

// ---------------------------------------------------------------- the symmetric engine's epilogues

// A symmetric strip (SymmetricEpilogue in pairwise_driver.h): rows r in [0, t) are anchors
// row0 + r, columns c in [0, W) anchors row0 + c (c == r: the anchor itself); the columns
// c >= t are the later anchors whose side the strip serves too. lab, nsq: all anchors'.
template <typename T, typename L>
struct SymStrip {
  T* S;
  int64_t t, W, row0;
  const L* lab;
  const T* nsq;
  SymStrip(const at::Tensor& S_, int64_t row0_, const PairwiseRows& rows)
      : S(S_.data_ptr<T>()), t(S_.size(0)), W(S_.size(1)), row0(row0_), lab(rows.labels.data_ptr<L>()),
        nsq(rows.x_sq.data_ptr<T>()) {}
  // The strip's row r as a Row of the strip epilogues: references are its columns, self_j = r.
  Row<T, L> row(int64_t r, T* stats) const {
    const int64_t i = row0 + r;
    return Row<T, L>{S + r * W, W, lab + row0, lab[i], r, nsq[i], nsq + row0, stats};
  }
};

// Columns per parallel task of the column side: a t x kSymCols block stays in L2.
constexpr int64_t kSymCols = 256;

// ---- the log-sum-exp losses' statistics pass, tiled: each pair's logit once, one exp per side

// Per anchor of the strip's later columns or rows: running (max, sum of exps) of its positives'
// and of its negatives' logits, and (SupCon) the sum of its positive logits. (m, z) pairs merge
// as log-sum-exps: z e^(m - M) + z' e^(m' - M), M = max(m, m').
template <typename T>
SLF_HD void merge_mz(T& m, T& z, T m2, T z2) {
  if (z2 == T(0)) return;  // nothing (a NaN z2 is merged: it must reach the loss)
  if (z == T(0)) {
    m = m2;
    z = z2;
    return;
  }
  const T M = m > m2 ? m : m2;
  z = z * exp_(m - M) + z2 * exp_(m2 - M);
  m = M;
}

constexpr int64_t kSymTileRows = 32;  // a 32 x kSymCols tile of logits stays in L1

// One column block [c0, c1) of a strip, all its rows: row_part (t x 5: m_p, z_p, m_n, z_n, sum of
// positive logits) gets the rows' partials over these columns (the anchor itself excluded), and
// acc (B x 5, same layout) the later anchors' (c >= t) over all of the strip's rows.
template <typename T, typename L, typename Logits, bool kSumPos>
SLF_CPU_MULTIVERSION void lse_sym_block(const SymStrip<T, L>& st, const Logits& lg, int64_t c0, int64_t c1,
                                        T* row_part, T* acc) {
  const int64_t n = c1 - c0, W = st.W, t = st.t;
  std::vector<T> tile(kSymTileRows * n), col(9 * n);
  T* const cmp = col.data();  // this row tile's column maxima, P and N
  T* const cmn = cmp + n;
  T* const czp = cmn + n;  // and sums
  T* const czn = czp + n;
  T* const rmp = czn + n;  // the block's running (m, z) per column, P and N
  T* const rzp = rmp + n;
  T* const rmn = rzp + n;
  T* const rzn = rmn + n;
  T* const rsa = rzn + n;  // sum of positive logits per column
  std::fill(rzp, rzp + n, T(0));
  std::fill(rzn, rzn + n, T(0));
  std::fill(rsa, rsa + n, T(0));
  std::fill(rmp, rmp + n, neg_inf<T>());
  std::fill(rmn, rmn + n, neg_inf<T>());
  const L* const lc = st.lab + st.row0 + c0;
  for (int64_t r0 = 0; r0 < t; r0 += kSymTileRows) {
    const int64_t r1 = std::min(t, r0 + kSymTileRows);
    std::fill(cmp, cmp + n, neg_inf<T>());
    std::fill(cmn, cmn + n, neg_inf<T>());
    std::fill(czp, czp + n, T(0));
    std::fill(czn, czn + n, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = st.S + r * W + c0;
      T* a_row = tile.data() + (r - r0) * n;
      const L li = st.lab[st.row0 + r];
      const int64_t self_q = r - c0;  // the anchor itself, if in this block
      T mp = neg_inf<T>(), mn = neg_inf<T>(), sa = T(0);
#pragma omp simd reduction(max : mp, mn) reduction(+ : sa)
      for (int64_t q = 0; q < n; ++q) {
        const bool same = lc[q] == li;
        const T a = same ? lg.pos(s[q]) : lg.neg(s[q]);
        a_row[q] = a;
        const T vp = (same && q != self_q) ? a : neg_inf<T>();
        const T vn = same ? neg_inf<T>() : a;
        mp = mp > vp ? mp : vp;  // canonical max form, see twoset_forward
        mn = mn > vn ? mn : vn;
        sa += (kSumPos && same && q != self_q) ? a : T(0);
        const T cp = same ? a : neg_inf<T>();
        cmp[q] = cmp[q] > cp ? cmp[q] : cp;
        cmn[q] = cmn[q] > vn ? cmn[q] : vn;
        rsa[q] += (kSumPos && same) ? a : T(0);
      }
      T* part = row_part + r * 5;
      part[0] = mp;
      part[2] = mn;
      part[4] = sa;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const T* a_row = tile.data() + (r - r0) * n;
      const L li = st.lab[st.row0 + r];
      const int64_t self_q = r - c0;
      T* part = row_part + r * 5;
      const T mp = part[0], mn = part[2];
      T zp = T(0), zn = T(0);
#pragma omp simd reduction(+ : zp, zn)
      for (int64_t q = 0; q < n; ++q) {
        const bool same = lc[q] == li;
        const T a = a_row[q];
        const T er = exp_fast(a - (same ? mp : mn));
        zp += (same && q != self_q) ? er : T(0);
        zn += same ? T(0) : er;
        const T ec = exp_fast(a - (same ? cmp[q] : cmn[q]));
        czp[q] += same ? ec : T(0);
        czn[q] += same ? T(0) : ec;
      }
      part[1] = zp;
      part[3] = zn;
    }
    for (int64_t q = 0; q < n; ++q) {
      merge_mz(rmp[q], rzp[q], cmp[q], czp[q]);
      merge_mz(rmn[q], rzn[q], cmn[q], czn[q]);
    }
  }
  for (int64_t q = std::max<int64_t>(0, t - c0); q < n; ++q) {  // the later anchors
    T* a = acc + (st.row0 + c0 + q) * 5;
    merge_mz(a[0], a[1], rmp[q], rzp[q]);
    merge_mz(a[2], a[3], rmn[q], rzn[q]);
    a[4] += rsa[q];
  }
}

// The strip's statistics pass: column blocks in parallel (block(c0, c1, row_part)), then each
// row's block partials merged in block order (deterministic) into acc.
template <typename T, typename L, typename Block>
void lse_sym_blocks(const SymStrip<T, L>& st, const Block& block, T* acc) {
  const int64_t t = st.t, W = st.W, blocks = (W + kSymCols - 1) / kSymCols;
  std::vector<T> parts(blocks * t * 5);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) block(k * kSymCols, std::min(W, (k + 1) * kSymCols), parts.data() + k * t * 5);
  });
  for (int64_t r = 0; r < t; ++r) {  // (t x blocks merges: less than a parallel region's cost)
    T* a = acc + (st.row0 + r) * 5;
    for (int64_t k = 0; k < blocks; ++k) {
      const T* p = parts.data() + (k * t + r) * 5;
      merge_mz(a[0], a[1], p[0], p[1]);
      merge_mz(a[2], a[3], p[2], p[3]);
      a[4] += p[4];
    }
  }
}

template <typename T, typename L, typename Logits, bool kSumPos>
void lse_sym_accumulate(const SymStrip<T, L>& st, const Logits& lg, T* acc) {
  lse_sym_blocks(st, [&](int64_t c0, int64_t c1, T* part) { lse_sym_block<T, L, Logits, kSumPos>(st, lg, c0, c1, part, acc); },
                 acc);
}

// SupCon's logits s / t are bounded by K = max_i ||x_i||^2 / t (|s_ij| <= sqrt(n_i n_j)): with
// that one shift for every anchor, exp(a - K) stays in float range when the logits span at most
// kFixedShiftSpan (2K), and one exp per pair serves both of its anchors, in both passes. NaN when
// the bound does not apply (then the max-shifted tiles run).
constexpr double kFixedShiftSpan = 80.0;

template <typename T>
T supcon_fixed_shift(const PairwiseRows& rows, const PairwiseSpec& spec) {
  if (spec.value != kValueGemm) return std::numeric_limits<T>::quiet_NaN();
  const T K = rows.x_sq.max().template item<T>() / static_cast<T>(spec.p[0]);
  return (K >= T(0) && 2 * K <= T(kFixedShiftSpan)) ? K : std::numeric_limits<T>::quiet_NaN();
}

template <typename T, typename L>
SLF_CPU_MULTIVERSION void supcon_sym_block_fixed(const SymStrip<T, L>& st, T inv_t, T K, int64_t c0, int64_t c1,
                                                 T* row_part, T* acc) {
  const int64_t n = c1 - c0, W = st.W, t = st.t;
  std::vector<T> col(3 * n, T(0));
  T* const czp = col.data();
  T* const czn = czp + n;
  T* const csa = czn + n;
  const L* const lc = st.lab + st.row0 + c0;
  for (int64_t r = 0; r < t; ++r) {
    const T* s = st.S + r * W + c0;
    const L li = st.lab[st.row0 + r];
    const int64_t self_q = r - c0;
    T zp = T(0), zn = T(0), sa = T(0);
#pragma omp simd reduction(+ : zp, zn, sa)
    for (int64_t q = 0; q < n; ++q) {
      const bool same = lc[q] == li, mine = q != self_q;
      const T a = s[q] * inv_t;
      const T e = exp_fast(a - K);
      zp += (same && mine) ? e : T(0);
      zn += same ? T(0) : e;
      sa += (same && mine) ? a : T(0);
      czp[q] += same ? e : T(0);
      czn[q] += same ? T(0) : e;
      csa[q] += same ? a : T(0);
    }
    T* part = row_part + r * 5;
    part[0] = K;
    part[1] = zp;
    part[2] = K;
    part[3] = zn;
    part[4] = sa;
  }
  for (int64_t q = std::max<int64_t>(0, t - c0); q < n; ++q) {
    T* a = acc + (st.row0 + c0 + q) * 5;
    merge_mz(a[0], a[1], K, czp[q]);
    merge_mz(a[2], a[3], K, czn[q]);
    a[4] += csa[q];
  }
}

// Per anchor: its positives and negatives among the other anchors (labels equal / different).
template <typename L>
void class_counts(const L* lab, int64_t B, std::vector<int64_t>& n_pos) {
  std::vector<L> sorted(lab, lab + B);
  std::sort(sorted.begin(), sorted.end());
  n_pos.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    const auto range = std::equal_range(sorted.begin(), sorted.end(), lab[i]);
    n_pos[i] = (range.second - range.first) - 1;
  }
}

// ---- two-set losses: acc = (m_p, z_p, m_n, z_n, -) (lse_sym_accumulate)

// NaN-preserving log-sum-exp of an (m, z) pair; -inf for an empty set.
template <typename T>
SLF_HD T mz_lse(T m, T z) {
  return z != T(0) ? m + log_(z) : neg_inf<T>();
}

template <typename T, typename L, typename Combine>
void twoset_sym_finish(const T* acc, const L* lab, int64_t B, const Combine& combine, bool row_counted, T* stats) {
  std::vector<int64_t> n_pos;
  class_counts(lab, B, n_pos);
  at::parallel_for(0, B, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* a = acc + i * 5;
      const bool hp = n_pos[i] > 0, hn = B - 1 - n_pos[i] > 0;
      const T lse_p = hp ? mz_lse(a[0], a[1]) : neg_inf<T>(), lse_n = hn ? mz_lse(a[2], a[3]) : neg_inf<T>();
      const TwoSetResult<T> res = combine(lse_p, lse_n, hp, hn);
      T* st = stats + i * kNumPairStats;
      st[kPairAux0] = lse_p;
      st[kPairAux1] = lse_n;
      st[kPairSum0] = res.loss;
      st[kPairCount0] = (!row_counted || row_counts(res.loss)) ? T(1) : T(0);
      st[kPairNumPos] = static_cast<T>(n_pos[i]);
      st[kPairNumNeg] = static_cast<T>(B - 1 - n_pos[i]);
    }
  });
}

// Per anchor of the strip's columns, for weights w: the coefficients of its positives and of its
// negatives, and its two log-sum-exps (k * W + c: array k, column c).
template <typename T, typename Combine>
std::vector<T> twoset_sym_coefficients(const T* stats, const T* w, int64_t lo, int64_t hi, const Combine& combine,
                                       bool row_counted) {
  const int64_t W = hi - lo;
  std::vector<T> c(4 * W);
  for (int64_t k = 0; k < W; ++k) {
    const T* st = stats + (lo + k) * kNumPairStats;
    const T wi = (row_counted && st[kPairCount0] == T(0)) ? T(0) : w[lo + k];
    const TwoSetResult<T> res = combine(st[kPairAux0], st[kPairAux1], st[kPairNumPos] > 0, st[kPairNumNeg] > 0);
    c[k] = wi * res.dlse_pos;
    c[W + k] = wi * res.dlse_neg;
    c[2 * W + k] = st[kPairAux0];
    c[3 * W + k] = st[kPairAux1];
  }
  return c;
}

template <typename T, typename L, typename Logits>
SLF_CPU_MULTIVERSION void twoset_sym_grad_rows(const SymStrip<T, L>& st, const Logits& lg, const T* cof, int64_t r0,
                                               int64_t r1) {
  const int64_t W = st.W, t = st.t;
  const T* const cpp = cof;
  const T* const cnp = cof + W;
  const T* const lpp = cof + 2 * W;
  const T* const lnp = cof + 3 * W;
  const L* const lc = st.lab + st.row0;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = st.S + r * W;
    const L li = lc[r];
    const T cpi = cpp[r], cni = cnp[r], lpi = lpp[r], lni = lnp[r];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const T sc = s[c];
      const bool same = lc[c] == li;
      const T a = same ? lg.pos(sc) : lg.neg(sc);
      const T da = same ? lg.pos_grad(sc) : lg.neg_grad(sc);
      const T ci = same ? cpi : cni, cj = same ? cpp[c] : cnp[c];
      const T gi = (c != r && ci != T(0)) ? ci * exp_fast(a - (same ? lpi : lni)) : T(0);
      const T gj = (c >= t && cj != T(0)) ? cj * exp_fast(a - (same ? lpp[c] : lnp[c])) : T(0);
      s[c] = (gi + gj) * da;
    }
  }
}

// ---- SupCon: acc = (m_p, z_p, m_n, z_n, sum of positive logits) (lse_sym_accumulate)

template <typename T>
struct SupConLogits {
  T inv_t;
  SLF_HD T pos(T s) const { return s * inv_t; }
  SLF_HD T neg(T s) const { return s * inv_t; }
};

template <typename T, typename L>
void supcon_sym_finish(const T* acc, const L* lab, int64_t B, T* stats) {
  std::vector<int64_t> n_pos;
  class_counts(lab, B, n_pos);
  at::parallel_for(0, B, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* a = acc + i * 5;
      const T np = static_cast<T>(n_pos[i]);
      const T lp = mz_lse(a[0], a[1]), ln = mz_lse(a[2], a[3]);
      const T m = lp > ln ? lp : ln;  // log-sum-exp over P u N
      const T lse = m == neg_inf<T>() ? m : m + log_(exp_(lp - m) + exp_(ln - m));
      const T mean_p = np > T(0) ? a[4] / np : T(0);
      const T loss = np > T(0) ? lse - mean_p : T(0);
      T* st = stats + i * kNumPairStats;
      st[kPairAux0] = lse;
      st[kPairAux1] = mean_p;
      st[kPairSum0] = loss;
      st[kPairCount0] = row_counts(loss) ? T(1) : T(0);
      st[kPairNumPos] = np;
      st[kPairNumNeg] = static_cast<T>(B - 1 - n_pos[i]);
    }
  });
}

// Per anchor of the strip's columns: w/t (0 if it does not count), that over its n_p, its lse.
template <typename T>
std::vector<T> supcon_sym_coefficients(const T* stats, const T* w, int64_t lo, int64_t hi, T inv_t) {
  const int64_t W = hi - lo;
  std::vector<T> c(3 * W);
  for (int64_t k = 0; k < W; ++k) {
    const T* st = stats + (lo + k) * kNumPairStats;
    const T wc = st[kPairCount0] == T(0) ? T(0) : w[lo + k] * inv_t;
    c[k] = wc;
    c[W + k] = st[kPairNumPos] > T(0) ? wc / st[kPairNumPos] : T(0);
    c[2 * W + k] = st[kPairAux0];
  }
  return c;
}

// With the fixed shift K: pi_ij = exp(a_ij - K) exp(K - lse_i), the second factor per anchor.
template <typename T, typename L>
SLF_CPU_MULTIVERSION void supcon_sym_grad_rows_fixed(const SymStrip<T, L>& st, T inv_t, T K, const T* cof,
                                                     int64_t r0, int64_t r1) {
  const int64_t W = st.W, t = st.t;
  const T* const csp = cof;  // w/t exp(K - lse) (0 if the anchor does not count)
  const T* const cqp = cof + W;
  const L* const lc = st.lab + st.row0;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = st.S + r * W;
    const L li = lc[r];
    const T csi = csp[r], cqi = cqp[r];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const T e = exp_fast(s[c] * inv_t - K);
      const bool same = lc[c] == li;
      const T gi = csi * e - (same ? cqi : T(0));
      const T gj = csp[c] * e - (same ? cqp[c] : T(0));
      s[c] = (c != r ? gi : T(0)) + (c >= t ? gj : T(0));
    }
  }
}

template <typename T, typename L>
SLF_CPU_MULTIVERSION void supcon_sym_grad_rows(const SymStrip<T, L>& st, T inv_t, const T* cof, int64_t r0,
                                               int64_t r1) {
  const int64_t W = st.W, t = st.t;
  const T* const csp = cof;
  const T* const cqp = cof + W;
  const T* const lsep = cof + 2 * W;
  const L* const lc = st.lab + st.row0;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = st.S + r * W;
    const L li = lc[r];
    const T csi = csp[r], cqi = cqp[r], lsei = lsep[r];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const T a = s[c] * inv_t;
      const bool same = lc[c] == li;
      const T gi = csi != T(0) ? csi * exp_fast(a - lsei) - (same ? cqi : T(0)) : T(0);
      const T gj = csp[c] != T(0) ? csp[c] * exp_fast(a - lsep[c]) - (same ? cqp[c] : T(0)) : T(0);
      s[c] = (c != r ? gi : T(0)) + (c >= t ? gj : T(0));
    }
  }
}

// ---- contrastive: acc = (sum_p, nz_p, sum_n, nz_n), one pass

// One column block [c0, c1), all rows of the strip: the rows' sums over these columns (t x 4,
// row_part), the later anchors' sums over all rows (added to acc), and with want_grad the strip's
// unit-weight gradient in place (both anchors' terms: the pair's gradient is the same for both).
template <typename T, typename L>
SLF_CPU_MULTIVERSION void contrastive_sym_block(const SymStrip<T, L>& st, T pm, T nm, bool direct, bool want_grad,
                                                int64_t c0, int64_t c1, T* row_part, T* acc) {
  const int64_t n = c1 - c0, W = st.W, t = st.t;
  std::vector<T> col(4 * n, T(0));
  T* const csp = col.data();
  T* const czp = csp + n;
  T* const csn = czp + n;
  T* const czn = csn + n;
  const L* const lc = st.lab + st.row0 + c0;
  const T* const nc = st.nsq + st.row0 + c0;
  for (int64_t r = 0; r < t; ++r) {
    T* s = st.S + r * W + c0;
    const L li = st.lab[st.row0 + r];
    const T ni = st.nsq[st.row0 + r];
    const int64_t self_q = r - c0, later_q = t - c0;  // columns q >= later_q are later anchors
    T sp = T(0), zp = T(0), sn = T(0), zn = T(0);
#pragma omp simd reduction(+ : sp, zp, sn, zn)
    for (int64_t q = 0; q < n; ++q) {
      const T d = direct ? s[q] : pair_distance(s[q], ni, nc[q]);
      const bool same = lc[q] == li, mine = q != self_q;
      const T lp = relu(d - pm), ln = relu(nm - d);
      const T cnt_p = (same && row_counts(lp)) ? T(1) : T(0), cnt_n = (!same && row_counts(ln)) ? T(1) : T(0);
      sp += (same && mine) ? lp : T(0);
      zp += mine ? cnt_p : T(0);
      sn += same ? T(0) : ln;
      zn += cnt_n;
      csp[q] += same ? lp : T(0);
      czp[q] += cnt_p;
      csn[q] += same ? T(0) : ln;
      czn[q] += cnt_n;
      if (want_grad) {  // loop-invariant: unswitched by the compiler
        const T dd = direct ? T(1) : pair_distance_grad(d);
        const T sides = (mine ? T(1) : T(0)) + (q >= later_q ? T(1) : T(0));
        const T g = same ? relu_grad(d - pm) * dd : -relu_grad(nm - d) * dd;
        s[q] = sides == T(0) ? T(0) : sides * g;
      }
    }
    T* part = row_part + r * 4;
    part[0] = sp;
    part[1] = zp;
    part[2] = sn;
    part[3] = zn;
  }
  for (int64_t q = std::max<int64_t>(0, t - c0); q < n; ++q) {
    T* a = acc + (st.row0 + c0 + q) * 4;
    a[0] += csp[q];
    a[1] += czp[q];
    a[2] += csn[q];
    a[3] += czn[q];
  }
}

template <typename T, typename L>
void contrastive_sym_accumulate(const SymStrip<T, L>& st, T pm, T nm, bool direct, bool want_grad, T* acc) {
  const int64_t t = st.t, W = st.W, blocks = (W + kSymCols - 1) / kSymCols;
  std::vector<T> parts(blocks * t * 4);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      contrastive_sym_block(st, pm, nm, direct, want_grad, k * kSymCols, std::min(W, (k + 1) * kSymCols),
                            parts.data() + k * t * 4, acc);
    }
  });
  for (int64_t r = 0; r < t; ++r) {  // each row's block partials, in block order
    T* a = acc + (st.row0 + r) * 4;
    for (int64_t k = 0; k < blocks; ++k) {
      const T* p = parts.data() + (k * t + r) * 4;
      for (int64_t q = 0; q < 4; ++q) a[q] += p[q];
    }
  }
}

template <typename T, typename L>
void contrastive_sym_finish(const T* acc, const L* lab, int64_t B, T* stats) {
  std::vector<int64_t> n_pos;
  class_counts(lab, B, n_pos);
  for (int64_t i = 0; i < B; ++i) {
    const T* a = acc + i * 4;
    T* st = stats + i * kNumPairStats;
    st[kPairSum0] = a[0];
    st[kPairCount0] = a[1];
    st[kPairSum1] = a[2];
    st[kPairCount1] = a[3];
    st[kPairNumPos] = static_cast<T>(n_pos[i]);
    st[kPairNumNeg] = static_cast<T>(B - 1 - n_pos[i]);
  }
}

template <typename T, typename L>
SLF_CPU_MULTIVERSION void contrastive_sym_grad_rows(const SymStrip<T, L>& st, T pm, T nm, bool direct, const T* cof,
                                                    int64_t r0, int64_t r1) {
  const int64_t W = st.W, t = st.t;
  const T* const wpp = cof;  // the column anchors' weights of their two terms
  const T* const wnp = cof + W;
  const L* const lc = st.lab + st.row0;
  const T* const nc = st.nsq + st.row0;
  for (int64_t r = r0; r < r1; ++r) {
    T* s = st.S + r * W;
    const L li = lc[r];
    const T ni = nc[r], wpi = wpp[r], wni = wnp[r];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const T d = direct ? s[c] : pair_distance(s[c], ni, nc[c]);
      const T dd = direct ? T(1) : pair_distance_grad(d);
      const bool same = lc[c] == li;
      const T wsum = (c != r ? (same ? wpi : wni) : T(0)) + (c >= t ? (same ? wpp[c] : wnp[c]) : T(0));
      const T g = same ? relu_grad(d - pm) * dd : -relu_grad(nm - d) * dd;
      s[c] = wsum == T(0) ? T(0) : wsum * g;
    }
  }
}

// ---- dispatch

template <typename Fn>
void sym_dispatch(const at::Tensor& S, const PairwiseRows& rows, Fn&& fn) {
  dispatch_types(S, rows.labels, [&](auto t0, auto l0) { fn(t0, l0); });
}

template <typename T, typename Fn>
void with_twoset(const PairwiseSpec& spec, Fn&& fn) {
  const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]), p2 = static_cast<T>(spec.p[2]);
  const auto joint = [](T lp, T ln, bool hp, bool hn) { return combine_joint(lp, ln, hp, hn); };
  switch (spec.loss) {
    case kCircle:
      return fn(CircleLogits<T>(p0, p1), joint, true);
    case kUnified:
      return fn(UnifiedLogits<T>(p0, p1), joint, true);
    default: {
      const T ia = T(1) / p0, ib = T(1) / p1;
      const auto separate = [ia, ib](T lp, T ln, bool, bool) { return combine_separate(lp, ln, ia, ib); };
      return fn(MultiSimilarityLogits<T>(p0, p1, p2), separate, false);
    }
  }
}

void sym_accumulate(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, at::Tensor& acc,
                    bool want_grad) {
  sym_dispatch(S, rows, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    const SymStrip<T, L> st(S, row0, rows);
    T* a = acc.data_ptr<T>();
    const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]);
    if (spec.loss == kSupCon) {
      const T inv_t = T(1) / p0, K = supcon_fixed_shift<T>(rows, spec);
      if (K == K) {
        return lse_sym_blocks(st, [&](int64_t c0, int64_t c1, T* part) {
          supcon_sym_block_fixed(st, inv_t, K, c0, c1, part, a);
        }, a);
      }
      return lse_sym_accumulate<T, L, SupConLogits<T>, true>(st, SupConLogits<T>{inv_t}, a);
    }
    if (spec.loss == kContrastive) return contrastive_sym_accumulate(st, p0, p1, spec.direct(), want_grad, a);
    with_twoset<T>(spec, [&](const auto& lg, const auto&, bool) {
      lse_sym_accumulate<T, L, std::decay_t<decltype(lg)>, false>(st, lg, a);
    });
  });
}

void sym_finish(const at::Tensor& acc, const PairwiseRows& rows, const PairwiseSpec& spec, at::Tensor& row_stats) {
  sym_dispatch(acc, rows, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    const T* a = acc.data_ptr<T>();
    const L* lab = rows.labels.data_ptr<L>();
    T* st = row_stats.data_ptr<T>();
    const int64_t B = acc.size(0);
    if (spec.loss == kSupCon) return supcon_sym_finish(a, lab, B, st);
    if (spec.loss == kContrastive) return contrastive_sym_finish(a, lab, B, st);
    with_twoset<T>(spec, [&](const auto&, const auto& combine, bool row_counted) {
      twoset_sym_finish(a, lab, B, combine, row_counted, st);
    });
  });
}

void sym_gradient(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                  const at::Tensor& row_stats, const at::Tensor& row_weights) {
  sym_dispatch(S, rows, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    const SymStrip<T, L> st(S, row0, rows);
    const T* stats = row_stats.data_ptr<T>();
    const T* w = row_weights.data_ptr<T>();
    const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]);
    const int64_t grain = row_grain(st.W);
    const int64_t B = row_stats.size(0);
    if (spec.loss == kSupCon) {
      std::vector<T> cof = supcon_sym_coefficients(stats, w, row0, B, T(1) / p0);
      const T K = supcon_fixed_shift<T>(rows, spec);
      if (K == K) {
        for (int64_t c = 0; c < st.W; ++c) cof[c] = cof[c] == T(0) ? T(0) : cof[c] * exp_(K - cof[2 * st.W + c]);
        return at::parallel_for(0, st.t, grain, [&](int64_t b, int64_t e) {
          supcon_sym_grad_rows_fixed(st, T(1) / p0, K, cof.data(), b, e);
        });
      }
      return at::parallel_for(0, st.t, grain, [&](int64_t b, int64_t e) {
        supcon_sym_grad_rows(st, T(1) / p0, cof.data(), b, e);
      });
    }
    if (spec.loss == kContrastive) {
      std::vector<T> cof(2 * st.W);
      for (int64_t c = 0; c < st.W; ++c) {
        cof[c] = w[(row0 + c) * 2];
        cof[st.W + c] = w[(row0 + c) * 2 + 1];
      }
      return at::parallel_for(0, st.t, grain, [&](int64_t b, int64_t e) {
        contrastive_sym_grad_rows(st, p0, p1, spec.direct(), cof.data(), b, e);
      });
    }
    with_twoset<T>(spec, [&](const auto& lg, const auto& combine, bool row_counted) {
      const std::vector<T> cof = twoset_sym_coefficients(stats, w, row0, B, combine, row_counted);
      at::parallel_for(0, st.t, grain, [&](int64_t b, int64_t e) { twoset_sym_grad_rows(st, lg, cof.data(), b, e); });
    });
  });
}

const SymmetricEpilogue kSymTwoPass{5, true, false, &sym_accumulate, &sym_finish, &sym_gradient, kCpuStripElems};
const SymmetricEpilogue kSymSupCon{5, true, false, &sym_accumulate, &sym_finish, &sym_gradient, kCpuStripElems};
const SymmetricEpilogue kSymContrastive{4, false, true, &sym_accumulate, &sym_finish, &sym_gradient, kCpuStripElems};

// The symmetric engine's epilogue for this problem, or nullptr (then the strip engine runs).
const SymmetricEpilogue* symmetric_epilogue(const PairwiseSpec& spec) {
  if (!spec.ref_is_x || spec.raw_norms || spec.miner != kMinerNone || aten_epilogue_forced() ||
      !symmetric_engine_enabled()) {
    return nullptr;
  }
  switch (spec.loss) {
    case kCircle: case kUnified: case kMultiSimilarity: return &kSymTwoPass;
    case kSupCon: return &kSymSupCon;
    case kContrastive: return &kSymContrastive;
    default: return nullptr;
  }
}

// Labels are compared as int32 when every value fits (half the bytes per compare in the
// hot loop), as int64 otherwise. Both label tensors are converted together so that equal
// labels stay equal.
std::pair<at::Tensor, at::Tensor> compact_labels(const at::Tensor& labels, const at::Tensor& ref_labels) {
  if (labels.scalar_type() == at::kInt) return {labels.contiguous(), ref_labels.contiguous()};
  const auto fits = [](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t k = 0, n = c.numel(); k < n; ++k) {
      if (p[k] < std::numeric_limits<int32_t>::min() || p[k] > std::numeric_limits<int32_t>::max()) return false;
    }
    return true;
  };
  if (fits(labels) && fits(ref_labels)) return {labels.to(at::kInt), ref_labels.to(at::kInt)};
  return {labels.contiguous(), ref_labels.contiguous()};
}

const PairwiseEpilogue& pick() { return aten_epilogue_forced() ? kAtenEpilogue : kCpuEpilogue; }

// The spec of an op call; row_params (B,) is required exactly by the losses that take it. The
// returned tensor owns the parameters spec.row_params points to (x's dtype, contiguous).
std::pair<PairwiseSpec, at::Tensor> checked_spec(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                                                 const at::Tensor& ref_labels, const at::Tensor* row_params,
                                                 int64_t self_offset, bool ref_is_x, int64_t loss,
                                                 at::ArrayRef<double> params) {
  PairwiseSpec spec = make_pairwise_spec(loss, params, self_offset, ref_is_x);
  check_pairwise_inputs(x, labels, ref, ref_labels, spec);
  TORCH_CHECK(pair_loss_has_row_params(loss) == (row_params != nullptr), "structloss_fast: pairwise loss ", loss,
              pair_loss_has_row_params(loss) ? " takes a parameter per anchor (op pairwise_loss_rowparam)"
                                             : " takes no per-anchor parameters (op pairwise_loss)");
  at::Tensor rp;
  if (row_params != nullptr) {
    TORCH_CHECK(row_params->dim() == 1 && row_params->size(0) == x.size(0), "structloss_fast: row_params must be (B,)");
    TORCH_CHECK(row_params->device() == x.device(), "structloss_fast: all inputs must be on one device");
    rp = row_params->to(x.scalar_type()).contiguous();
    spec.row_params = rp.data_ptr();
  }
  return {spec, rp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    int64_t self_offset, bool ref_is_x, int64_t loss, at::ArrayRef<double> params, int64_t grad_mode) {
  const PairwiseSpec spec = checked_spec(x, labels, ref, ref_labels, nullptr, self_offset, ref_is_x, loss, params).first;
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  if (const SymmetricEpilogue* sym = symmetric_epilogue(spec)) {
    TORCH_CHECK(grad_mode >= kGradNone && grad_mode < kNumPairGradModes, "structloss_fast: unknown grad_mode ", grad_mode);
    return pairwise_symmetric_forward_driver(x, lab, spec, grad_mode, *sym);
  }
  return pairwise_forward_driver(x, lab, ref, ref_lab, spec, grad_mode, pick());
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_backward_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, int64_t self_offset, bool ref_is_x, int64_t loss,
    at::ArrayRef<double> params, bool ref_grad) {
  const PairwiseSpec spec = checked_spec(x, labels, ref, ref_labels, nullptr, self_offset, ref_is_x, loss, params).first;
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  if (const SymmetricEpilogue* sym = symmetric_epilogue(spec)) {
    TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == x.size(0) && row_stats.size(1) == kNumPairStats,
                "structloss_fast: row_stats must be (B, ", kNumPairStats, ")");
    TORCH_CHECK(row_weights.dim() == 2 && row_weights.size(0) == x.size(0) && row_weights.size(1) == spec.terms(),
                "structloss_fast: row_weights must be (B, ", spec.terms(), ")");
    return pairwise_symmetric_backward_driver(x, lab, row_stats, row_weights, spec, *sym);
  }
  return pairwise_backward_driver(x, lab, ref, ref_lab, row_stats, row_weights, spec, ref_grad, pick());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_rowparam_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_params, int64_t self_offset, bool ref_is_x, int64_t loss, at::ArrayRef<double> params,
    int64_t grad_mode) {
  const auto [spec, rp] = checked_spec(x, labels, ref, ref_labels, &row_params, self_offset, ref_is_x, loss, params);
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  return pairwise_forward_driver(x, lab, ref, ref_lab, spec, grad_mode, pick());
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_rowparam_backward_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_params, const at::Tensor& row_stats, const at::Tensor& row_weights, int64_t self_offset,
    bool ref_is_x, int64_t loss, at::ArrayRef<double> params, bool ref_grad) {
  const auto [spec, rp] = checked_spec(x, labels, ref, ref_labels, &row_params, self_offset, ref_is_x, loss, params);
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  return pairwise_backward_driver(x, lab, ref, ref_lab, row_stats, row_weights, spec, ref_grad, pick());
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("pairwise_loss", &pairwise_loss_cpu);
  m.impl("pairwise_loss_backward", &pairwise_loss_backward_cpu);
  m.impl("pairwise_loss_rowparam", &pairwise_loss_rowparam_cpu);
  m.impl("pairwise_loss_rowparam_backward", &pairwise_loss_rowparam_backward_cpu);
}

}  // namespace structloss_fast
