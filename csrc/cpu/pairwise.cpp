// CPU epilogue of the fused pairwise engine: turns a T x M similarity strip into per-row
// statistics and the gradient dl/ds, row by row, in parallel over rows. Each row is walked
// a few times while it is hot in L1/L2; the loops are written to auto-vectorize inside the
// AVX2 clone of the multiversioned functions.
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

template <typename T, typename L>
struct StripArgs {
  T* S;                // t x M strip, row-major (similarities in, gradients out)
  int64_t M;
  int64_t row0;        // global index of the strip's first row
  const L* labels;     // (B,)
  const L* ref_labels; // (M,)
  bool exclude_self;
  T* stats;            // (B, kNumRowStats)
  const T* weights;    // (B,) upstream weights; backward only
  bool want_grad;      // forward only
};

// Forward of one row of a two-set loss. `buf` is scratch of M elements.
template <typename T, typename L, typename Logits>
SLF_HD void twoset_forward_row(T* s, T* buf, const L* ref_lab, L li, int64_t self_j, int64_t M, const Logits& lg,
                               bool want_grad, T* stats) {
  T max_p = neg_inf<T>(), max_n = neg_inf<T>();
  int64_t cnt_p = 0, cnt_n = 0;
#pragma omp simd reduction(max : max_p, max_n) reduction(+ : cnt_p, cnt_n)
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = ref_lab[j] == li;
    const bool pos = same && j != self_j;
    const bool neg = !same;
    const T a = same ? lg.pos(sj) : lg.neg(sj);
    buf[j] = a;
    max_p = (pos && a > max_p) ? a : max_p;
    max_n = (neg && a > max_n) ? a : max_n;
    cnt_p += pos ? 1 : 0;
    cnt_n += neg ? 1 : 0;
  }
  // A NaN logit never wins the comparisons above; it still reaches the sums below (and so
  // the loss), because exp(NaN - max) is NaN.
  T sum_p = T(0), sum_n = T(0);
#pragma omp simd reduction(+ : sum_p, sum_n)
  for (int64_t j = 0; j < M; ++j) {
    const bool same = ref_lab[j] == li;
    const bool pos = same && j != self_j;
    const T e = exp_fast(buf[j] - (same ? max_p : max_n));
    buf[j] = e;
    sum_p += pos ? e : T(0);
    sum_n += same ? T(0) : e;
  }
  const T lse_p = cnt_p > 0 ? max_p + log_(sum_p) : neg_inf<T>();
  const T lse_n = cnt_n > 0 ? max_n + log_(sum_n) : neg_inf<T>();
  const T loss = twoset_row_loss(lse_p, lse_n, cnt_p > 0, cnt_n > 0);
  stats[kLsePos] = lse_p;
  stats[kLseNeg] = lse_n;
  stats[kRowLoss] = loss;
  if (!want_grad) return;
  if (!row_counts(loss)) {
    std::fill(s, s + M, T(0));
    return;
  }
  const T dz = softplus_grad(lse_p + lse_n);
  const T c_p = dz / sum_p, c_n = dz / sum_n;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = ref_lab[j] == li;
    const bool pos = same && j != self_j;
    const T coef = same ? c_p * lg.pos_grad(sj) : c_n * lg.neg_grad(sj);
    const T g = coef * buf[j];
    s[j] = (same && !pos) ? T(0) : g;
  }
}

// Backward of one row from the saved statistics: s <- w * dl/ds.
template <typename T, typename L, typename Logits>
SLF_HD void twoset_backward_row(T* s, const L* ref_lab, L li, int64_t self_j, int64_t M, const Logits& lg,
                                const T* stats, T w) {
  const T lse_p = stats[kLsePos], lse_n = stats[kLseNeg];
  if (w == T(0) || !row_counts(stats[kRowLoss])) {
    std::fill(s, s + M, T(0));
    return;
  }
  const T dz = w * softplus_grad(lse_p + lse_n);
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const T sj = s[j];
    const bool same = ref_lab[j] == li;
    const bool pos = same && j != self_j;
    const T a = same ? lg.pos(sj) - lse_p : lg.neg(sj) - lse_n;
    const T da = same ? lg.pos_grad(sj) : lg.neg_grad(sj);
    const T g = dz * exp_fast(a) * da;
    s[j] = (same && !pos) ? T(0) : g;
  }
}

template <typename T, typename L, typename Logits>
SLF_CPU_MULTIVERSION void twoset_forward_rows(const StripArgs<T, L>& a, const Logits& lg, int64_t r_begin,
                                              int64_t r_end) {
  std::vector<T> buf(a.M);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t i = a.row0 + r;
    twoset_forward_row<T, L, Logits>(a.S + r * a.M, buf.data(), a.ref_labels, a.labels[i],
                                     a.exclude_self ? i : int64_t(-1), a.M, lg, a.want_grad,
                                     a.stats + i * kNumRowStats);
  }
}

template <typename T, typename L, typename Logits>
SLF_CPU_MULTIVERSION void twoset_backward_rows(const StripArgs<T, L>& a, const Logits& lg, int64_t r_begin,
                                               int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t i = a.row0 + r;
    twoset_backward_row<T, L, Logits>(a.S + r * a.M, a.ref_labels, a.labels[i], a.exclude_self ? i : int64_t(-1),
                                      a.M, lg, a.stats + i * kNumRowStats, a.weights[i]);
  }
}

// Rows per parallel task: enough work per task (about 64k pairs) to amortize the scheduling.
int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(M, 1)); }

template <typename T, typename L, typename Fn>
void with_logits(const PairwiseSpec& spec, Fn&& fn) {
  if (spec.loss == kCircle) {
    fn(CircleLogits<T>(static_cast<T>(spec.p0), static_cast<T>(spec.p1)));
  } else {
    fn(UnifiedLogits<T>(static_cast<T>(spec.p0), static_cast<T>(spec.p1)));
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
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(),
                      spec.exclude_self, row_stats.data_ptr<T>(), nullptr, want_grad};
    with_logits<T, L>(spec, [&](const auto& lg) {
      at::parallel_for(0, S.size(0), row_grain(a.M),
                       [&](int64_t b, int64_t e) { twoset_forward_rows(a, lg, b, e); });
    });
  });
}

void cpu_backward(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                  const PairwiseSpec& spec, const at::Tensor& row_stats, const at::Tensor& row_weights) {
  dispatch_types(S, labels, [&](auto t0, auto l0) {
    using T = decltype(t0);
    using L = decltype(l0);
    StripArgs<T, L> a{S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(),
                      spec.exclude_self, const_cast<T*>(row_stats.data_ptr<T>()), row_weights.data_ptr<T>(), true};
    with_logits<T, L>(spec, [&](const auto& lg) {
      at::parallel_for(0, S.size(0), row_grain(a.M),
                       [&](int64_t b, int64_t e) { twoset_backward_rows(a, lg, b, e); });
    });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    bool exclude_self, int64_t loss, at::ArrayRef<double> params, int64_t reduction, bool compute_grad) {
  const PairwiseSpec spec = make_pairwise_spec(loss, params, exclude_self);
  check_pairwise_inputs(x, labels, ref, ref_labels, spec);
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  return pairwise_forward_driver(x, lab, ref, ref_lab, spec, reduction, compute_grad, kCpuEpilogue);
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_backward_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, bool exclude_self, int64_t loss,
    at::ArrayRef<double> params) {
  const PairwiseSpec spec = make_pairwise_spec(loss, params, exclude_self);
  check_pairwise_inputs(x, labels, ref, ref_labels, spec);
  auto [lab, ref_lab] = compact_labels(labels, ref_labels);
  return pairwise_backward_driver(x, lab, ref, ref_lab, row_stats, row_weights, spec, kCpuEpilogue);
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("pairwise_loss", &pairwise_loss_cpu);
  m.impl("pairwise_loss_backward", &pairwise_loss_backward_cpu);
}

}  // namespace structloss_fast
