// CPU epilogue of the fused pairwise engine: turns a T x M similarity strip into per-anchor
// statistics and the gradient dl/ds, row by row, in parallel over rows. Each row is walked a
// few times while it is hot in L1/L2; the loops are written to auto-vectorize inside the AVX2
// clone of the multiversioned functions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
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

// One anchor row of a strip: similarities in s, gradient out in s.
template <typename T, typename L>
struct Row {
  T* s;
  int64_t M;
  const L* lab;
  L li;
  int64_t self_j;
  T* stats;  // this anchor's kNumPairStats statistics
};

// The row functions read a Row's fields into locals (s, M, lab, li, self_j) before their loops:
// stores through the row pointers could alias the struct's fields as far as the compiler knows,
// which keeps it from vectorizing the loops.
#define SLF_ROW_LOCALS(r)                           \
  T* const s = (r).s;                               \
  const int64_t M = (r).M;                          \
  [[maybe_unused]] const L* const lab = (r).lab;    \
  [[maybe_unused]] const L li = (r).li;             \
  [[maybe_unused]] const int64_t self_j = (r).self_j

// ---------------------------------------------------------------- two-set losses

template <typename T, typename L, typename Logits, typename Combine>
SLF_HD void twoset_forward(const Row<T, L> r, T* buf, const Logits& lg, const Combine& combine, bool row_counted,
                           bool want_grad) {
  SLF_ROW_LOCALS(r);
  T max_p = neg_inf<T>(), max_n = neg_inf<T>();
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(max : max_p, max_n) reduction(+ : cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T a = same ? lg.pos(sj) : lg.neg(sj);
    buf[j] = a;
    // Masked maxima in the canonical `m = m > v ? m : v` form: GCC 12 miscompiles the
    // conditional-update form `m = (c && a > m) ? a : m` of an omp-simd max reduction in
    // AVX2 code for double (the maximum comes out as 0; caught by the huge-scale tests).
    const T v_pos = pos ? a : neg_inf<T>();
    const T v_neg = same ? neg_inf<T>() : a;
    max_p = max_p > v_pos ? max_p : v_pos;
    max_n = max_n > v_neg ? max_n : v_neg;
    cnt_p += pos ? 1 : 0;
    cnt_n += same ? 0 : 1;
  }
  // A NaN logit makes the maximum NaN, and so the sums below and the loss.
  T sum_p = T(0), sum_n = T(0);
#pragma omp simd reduction(+ : sum_p, sum_n)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T e = exp_fast(buf[j] - (same ? max_p : max_n));
    buf[j] = e;
    sum_p += pos ? e : T(0);
    sum_n += same ? T(0) : e;
  }
  const T lse_p = cnt_p > 0 ? max_p + log_(sum_p) : neg_inf<T>();
  const T lse_n = cnt_n > 0 ? max_n + log_(sum_n) : neg_inf<T>();
  const TwoSetResult<T> res = combine(lse_p, lse_n, cnt_p > 0, cnt_n > 0);
  const bool counts = row_counted ? row_counts(res.loss) : true;
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
    const bool pos = same && j != self_j;
    const T coef = same ? c_p * lg.pos_grad(sj) : c_n * lg.neg_grad(sj);
    s[j] = (same && !pos) ? T(0) : coef * buf[j];
  }
}

template <typename T, typename L, typename Logits, typename Combine>
SLF_HD void twoset_backward(const Row<T, L> r, const Logits& lg, const Combine& combine, bool row_counted, T w) {
  SLF_ROW_LOCALS(r);
  const T* st = r.stats;
  const T lse_p = st[kPairAux0], lse_n = st[kPairAux1];
  if (w == T(0) || (row_counted && st[kPairCount0] == T(0))) {
    std::fill(s, s + M, T(0));
    return;
  }
  const TwoSetResult<T> res = combine(lse_p, lse_n, st[kPairNumPos] > 0, st[kPairNumNeg] > 0);
  const T c_p = w * res.dlse_pos, c_n = w * res.dlse_neg;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T a = same ? lg.pos(sj) - lse_p : lg.neg(sj) - lse_n;
    const T da = same ? c_p * lg.pos_grad(sj) : c_n * lg.neg_grad(sj);
    s[j] = (same && !pos) ? T(0) : da * exp_fast(a);
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
SLF_HD void contrastive_forward(const Row<T, L> r, T pos_margin, T neg_margin, bool want_grad) {
  SLF_ROW_LOCALS(r);
  T sum_p = T(0), sum_n = T(0), nz_p = T(0), nz_n = T(0);
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(+ : sum_p, sum_n, nz_p, nz_n, cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T d = unit_distance(s[j]);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T lp = relu(d - pos_margin), ln = relu(neg_margin - d);
    sum_p += pos ? lp : T(0);
    sum_n += same ? T(0) : ln;
    nz_p += (pos && row_counts(lp)) ? T(1) : T(0);
    nz_n += (!same && row_counts(ln)) ? T(1) : T(0);
    cnt_p += pos ? 1 : 0;
    cnt_n += same ? 0 : 1;
    if (want_grad) {  // loop-invariant: unswitched by the compiler
      const T dd = unit_distance_grad(d);
      s[j] = same ? (pos ? relu_grad(d - pos_margin) * dd : T(0)) : -relu_grad(neg_margin - d) * dd;
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
SLF_HD void contrastive_backward(const Row<T, L> r, T pos_margin, T neg_margin, T w_pos, T w_neg) {
  SLF_ROW_LOCALS(r);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T d = unit_distance(s[j]);
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T dd = unit_distance_grad(d);
    const T g_pos = w_pos * relu_grad(d - pos_margin) * dd;
    const T g_neg = -w_neg * relu_grad(neg_margin - d) * dd;
    s[j] = same ? (pos ? g_pos : T(0)) : g_neg;
  }
}

// ---------------------------------------------------------------- triplet, all triplets

// Loss of anchor i: sum over positives p and negatives n of relu(d_p - d_n + margin); count:
// the triplets with a non-zero loss. d/d d_p = w * #{n active}, d/d d_n = -w * #{p active}.
// With few positives every positive sweeps the negatives (vectorized); with many, both sets
// are sorted and counted by binary search (O(M log M)).
template <typename T, typename L>
void triplet_all_row(const Row<T, L> r, Scratch<T>& sc, T margin, bool want_stats, bool want_grad, T w) {
  SLF_ROW_LOCALS(r);
  sc.ensure_triplet(M);
  T* dp = sc.a.data();
  T* dn = sc.b.data();
  int64_t* ip = sc.ia.data();
  int64_t* in = sc.ib.data();
  int64_t np = 0, nn = 0;
  bool has_nan = false;
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const T d = unit_distance(s[j]);
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
  T loss = T(0), count = T(0);
  if (np > 0 && nn > 0 && !has_nan) {
    if (np <= 16) {
      std::fill(cntn, cntn + nn, T(0));
      for (int64_t p = 0; p < np; ++p) {
        const T dpv = dp[p];
        T sum = T(0), k = T(0);
#pragma omp simd reduction(+ : sum, k)
        for (int64_t n = 0; n < nn; ++n) {
          const T t = (dpv - dn[n]) + margin;
          const bool active = t > T(0);
          sum += active ? t : T(0);
          k += active ? T(1) : T(0);
          cntn[n] += active ? T(1) : T(0);
        }
        loss += sum;
        count += k;
        kp[p] = k;
      }
    } else {
      // Sorted negatives with prefix sums answer "how many, and which sum, below d_p + margin".
      std::vector<T> sorted_n(dn, dn + nn), sorted_p(dp, dp + np);
      std::sort(sorted_n.begin(), sorted_n.end());
      std::sort(sorted_p.begin(), sorted_p.end());
      double* prefix = sc.prefix.data();
      prefix[0] = 0.0;
      for (int64_t n = 0; n < nn; ++n) prefix[n + 1] = prefix[n] + static_cast<double>(sorted_n[n]);
      double loss_d = 0.0;
      for (int64_t p = 0; p < np; ++p) {
        const T thr = dp[p] + margin;
        const int64_t k = std::lower_bound(sorted_n.begin(), sorted_n.end(), thr) - sorted_n.begin();
        loss_d += static_cast<double>(k) * static_cast<double>(thr) - prefix[k];
        count += static_cast<T>(k);
        kp[p] = static_cast<T>(k);
      }
      loss = static_cast<T>(loss_d);
      for (int64_t n = 0; n < nn; ++n) {
        const int64_t below = std::upper_bound(sorted_p.begin(), sorted_p.end(), dn[n] - margin) - sorted_p.begin();
        cntn[n] = static_cast<T>(np - below);
      }
    }
  }
  if (has_nan) {
    loss = std::numeric_limits<T>::quiet_NaN();
    count = T(1);
  }
  if (want_stats) {
    T* st = r.stats;
    st[kPairSum0] = loss;
    st[kPairCount0] = count;
    st[kPairNumPos] = static_cast<T>(np);
    st[kPairNumNeg] = static_cast<T>(nn);
  }
  if (!want_grad) return;
  const T fill = has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
  std::fill(s, s + M, T(0));
  if (w == T(0) || np == 0 || nn == 0) return;
  for (int64_t p = 0; p < np; ++p) s[ip[p]] = has_nan ? fill : w * kp[p] * unit_distance_grad(dp[p]);
  for (int64_t n = 0; n < nn; ++n) s[in[n]] = has_nan ? fill : -w * cntn[n] * unit_distance_grad(dn[n]);
}

// ---------------------------------------------------------------- triplet, batch hard

// Hardest positive (largest d, first on ties) and hardest negative (smallest d, first on
// ties): relu(d_p* - d_n* + margin) for anchors that have both.
template <typename T, typename L>
SLF_HD void triplet_hard_row(const Row<T, L> r, T* buf, T margin, bool want_stats, bool want_grad, T w) {
  SLF_ROW_LOCALS(r);
  const T inf = static_cast<T>(INFINITY);
  T best_p = -inf, best_n = inf;
  int64_t np = 0, nn = 0, n_nan = 0;
#pragma omp simd reduction(max : best_p) reduction(min : best_n) reduction(+ : np, nn, n_nan)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = lab[j] == li;
    const bool pos = same && j != self_j;
    const T d = unit_distance(s[j]);
    buf[j] = d;
    const T vp = pos ? d : -inf;
    const T vn = same ? inf : d;
    best_p = best_p > vp ? best_p : vp;  // canonical max/min forms, see twoset_forward
    best_n = best_n < vn ? best_n : vn;
    np += pos ? 1 : 0;
    nn += same ? 0 : 1;
    n_nan += ((pos || !same) && d != d) ? 1 : 0;
  }
  // The first positive at the maximum and the first negative at the minimum.
  int64_t jp = -1, jn = -1;
  for (int64_t j = 0; j < M && (jp < 0 || jn < 0); ++j) {
    const bool same = lab[j] == li;
    if (jp < 0 && same && j != self_j && buf[j] == best_p) jp = j;
    if (jn < 0 && !same && buf[j] == best_n) jn = j;
  }
  const bool valid = np > 0 && nn > 0;
  T loss = valid ? relu((best_p - best_n) + margin) : T(0);
  if (valid && n_nan > 0) loss = std::numeric_limits<T>::quiet_NaN();
  const bool counts = valid && row_counts(loss);
  if (want_stats) {
    T* st = r.stats;
    st[kPairAux0] = static_cast<T>(jp);
    st[kPairAux1] = static_cast<T>(jn);
    st[kPairSum0] = loss;
    st[kPairCount0] = counts ? T(1) : T(0);
    st[kPairNumPos] = static_cast<T>(np);
    st[kPairNumNeg] = static_cast<T>(nn);
  }
  if (!want_grad) return;
  std::fill(s, s + M, T(0));
  if (!counts || w == T(0)) return;
  if (n_nan > 0) {  // a NaN distance: the extremes are undefined, the gradient is NaN
    std::fill(s, s + M, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const T g = w * relu_grad(loss);
  s[jp] = g * unit_distance_grad(best_p);
  s[jn] = -g * unit_distance_grad(best_n);
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
    const T dd = unit_distance_grad(d);  // NaN for a NaN distance, and relu_grad keeps it
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
  T* stats;          // (B, kNumPairStats)
  const T* weights;  // (B, terms); backward only
  bool want_grad;    // forward only
  bool backward;
};

template <typename T, typename L>
Row<T, L> row_at(const StripArgs<T, L>& a, int64_t r) {
  const int64_t i = a.row0 + r;
  return Row<T, L>{a.S + r * a.M, a.M, a.ref_labels, a.labels[i], self_column(*a.spec, i, a.M),
                   a.stats + i * kNumPairStats};
}

template <typename T, typename L, typename Logits, typename Combine>
SLF_CPU_MULTIVERSION void twoset_rows(const StripArgs<T, L>& a, const Logits& lg, const Combine& combine,
                                      bool row_counted, int64_t r_begin, int64_t r_end) {
  std::vector<T> buf(a.backward ? 0 : a.M);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const Row<T, L> row = row_at(a, r);
    if (a.backward) {
      twoset_backward(row, lg, combine, row_counted, a.weights[a.row0 + r]);
    } else {
      twoset_forward(row, buf.data(), lg, combine, row_counted, a.want_grad);
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
      case kContrastive:
        if (a.backward) {
          contrastive_backward(row, p0, p1, w0, a.weights[(a.row0 + r) * terms + 1]);
        } else {
          contrastive_forward(row, p0, p1, a.want_grad);
        }
        break;
      case kTripletAll: {
        const bool skip = a.backward && (w0 == T(0));
        if (skip) {
          std::fill(row.s, row.s + row.M, T(0));
        } else {
          triplet_all_row(row, sc, p0, !a.backward, a.backward || a.want_grad, w0);
        }
        break;
      }
      case kTripletHard:
        triplet_hard_row(row, sc.a.data(), p0, !a.backward, a.backward || a.want_grad,
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

template <typename T, typename L>
void run_rows(const StripArgs<T, L>& a, int64_t rows) {
  const PairwiseSpec& spec = *a.spec;
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

void cpu_forward(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                 const PairwiseSpec& spec, bool want_grad, at::Tensor& row_stats) {
  dispatch_types(S, labels, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(), &spec,
                      row_stats.data_ptr<T>(), nullptr, want_grad, false};
    run_rows(a, S.size(0));
  });
}

void cpu_backward(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                  const PairwiseSpec& spec, const at::Tensor& row_stats, const at::Tensor& row_weights) {
  dispatch_types(S, labels, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(), &spec,
                      const_cast<T*>(row_stats.data_ptr<T>()), row_weights.data_ptr<T>(), true, true};
    run_rows(a, S.size(0));
  });
}

// 16 MiB of float32 per strip: large enough for efficient GEMMs, small enough to stay
// far below the memory of a B x B matrix.
constexpr int64_t kCpuStripElems = int64_t(1) << 22;

const PairwiseEpilogue kCpuEpilogue{&cpu_forward, &cpu_backward, kCpuStripElems};

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
  return pairwise_forward_driver(x, lab, ref, ref_lab, spec, grad_mode, pick());
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_backward_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, int64_t self_offset, bool ref_is_x, int64_t loss,
    at::ArrayRef<double> params, bool ref_grad) {
  const PairwiseSpec spec = checked_spec(x, labels, ref, ref_labels, nullptr, self_offset, ref_is_x, loss, params).first;
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
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
