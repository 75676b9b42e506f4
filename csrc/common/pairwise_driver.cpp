#include "pairwise_driver.h"

#include <algorithm>
#include <limits>

#include "pairwise_math.h"

namespace structloss_fast {

PairwiseSpec make_pairwise_spec(int64_t loss, at::ArrayRef<double> params, bool exclude_self) {
  TORCH_CHECK(loss == kCircle || loss == kUnified, "structloss_fast: unknown pairwise loss id ", loss);
  TORCH_CHECK(params.size() == 2, "structloss_fast: pairwise loss ", loss, " takes 2 parameters, got ",
              params.size());
  return PairwiseSpec{loss, params[0], params[1], exclude_self};
}

void check_pairwise_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                           const at::Tensor& ref_labels, const PairwiseSpec& spec) {
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2, "structloss_fast: x and ref must be 2-D");
  TORCH_CHECK(x.size(1) == ref.size(1), "structloss_fast: x and ref differ in embedding size");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "structloss_fast: x and ref differ in dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "structloss_fast: pairwise kernels take float32 or float64 (low precision is upcast by the caller)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "structloss_fast: labels must be (B,)");
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0), "structloss_fast: ref_labels must be (M,)");
  TORCH_CHECK(labels.scalar_type() == ref_labels.scalar_type(), "structloss_fast: labels and ref_labels differ in dtype");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "structloss_fast: labels must be int64 or int32");
  TORCH_CHECK(!spec.exclude_self || x.size(0) == ref.size(0), "structloss_fast: exclude_self needs ref of x's length");
  for (const at::Tensor* t : {&labels, &ref, &ref_labels}) {
    TORCH_CHECK(t->device() == x.device(), "structloss_fast: all inputs must be on one device");
  }
}

namespace {

int64_t strip_rows(int64_t B, int64_t M, int64_t strip_elems) {
  int64_t t = std::max<int64_t>(1, strip_elems / std::max<int64_t>(M, 1));
  if (t >= 16) t -= t % 16;  // whole register tiles for the GEMMs
  return std::min(t, B);
}

// Accumulates the gradient of one strip: grad_x[rows] += G @ ref, grad_ref += G^T @ x[rows]
// (into grad_x itself when ref is x).
void accumulate_strip_grad(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, int64_t row0,
                           at::Tensor& grad_x, at::Tensor& grad_ref, bool exclude_self) {
  auto gx_rows = grad_x.narrow(0, row0, G.size(0));
  gx_rows.addmm_(G, ref);
  (exclude_self ? grad_x : grad_ref).addmm_(G.t(), x_rows);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const PairwiseSpec& spec, int64_t reduction, bool compute_grad, const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              "structloss_fast: unknown reduction id ", reduction);
  TORCH_CHECK(!(compute_grad && reduction == kReductionNone),
              "structloss_fast: compute_grad is for mean/sum; 'none' recomputes in backward");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ref = spec.exclude_self ? x : ref_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor ref_labels = spec.exclude_self ? labels : ref_labels_in.contiguous();
  const int64_t B = x.size(0), M = ref.size(0), D = x.size(1);

  at::Tensor row_stats = at::empty({B, kNumRowStats}, x.options());
  at::Tensor grad_x = at::zeros({compute_grad ? B : 0, D}, x.options());
  at::Tensor grad_ref = at::zeros({compute_grad && !spec.exclude_self ? M : 0, D}, x.options());

  if (M == 0) {
    // No reference: every row lacks a positive and a negative.
    row_stats.narrow(1, kLsePos, 2).fill_(-std::numeric_limits<double>::infinity());
    row_stats.select(1, kRowLoss).zero_();
  } else if (B > 0) {
    const int64_t T = strip_rows(B, M, epi.strip_elems);
    at::Tensor S = at::empty({T, M}, x.options());
    const at::Tensor ref_t = ref.t();
    for (int64_t row0 = 0; row0 < B; row0 += T) {
      const int64_t t = std::min(T, B - row0);
      at::Tensor strip = S.narrow(0, 0, t);
      const at::Tensor x_rows = x.narrow(0, row0, t);
      at::mm_out(strip, x_rows, ref_t);
      epi.forward(strip, row0, labels, ref_labels, spec, compute_grad, row_stats);
      if (compute_grad) accumulate_strip_grad(strip, x_rows, ref, row0, grad_x, grad_ref, spec.exclude_self);
    }
  }

  const at::Tensor row_loss = row_stats.select(1, kRowLoss);
  at::Tensor loss;
  if (reduction == kReductionNone) {
    loss = row_loss.clone();
  } else if (reduction == kReductionSum) {
    loss = row_loss.sum();
  } else {
    // Mean over the rows that count (loss > 0, or NaN); 0 when none do. No host sync.
    const at::Tensor count = row_loss.le(0).logical_not().sum().clamp_min(1).to(x.scalar_type());
    loss = row_loss.sum() / count;
    if (compute_grad) {
      grad_x.div_(count);
      grad_ref.div_(count);
    }
  }
  return {loss, row_stats, grad_x, grad_ref};
}

std::tuple<at::Tensor, at::Tensor> pairwise_backward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const at::Tensor& row_stats_in, const at::Tensor& row_weights_in, const PairwiseSpec& spec,
    const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ref = spec.exclude_self ? x : ref_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor ref_labels = spec.exclude_self ? labels : ref_labels_in.contiguous();
  const int64_t B = x.size(0), M = ref.size(0), D = x.size(1);
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == B && row_stats_in.size(1) == kNumRowStats,
              "structloss_fast: row_stats must be (B, ", kNumRowStats, ")");
  TORCH_CHECK(row_weights_in.dim() == 1 && row_weights_in.size(0) == B, "structloss_fast: row_weights must be (B,)");
  const at::Tensor row_stats = row_stats_in.to(x.scalar_type()).contiguous();
  const at::Tensor row_weights = row_weights_in.to(x.scalar_type()).contiguous();

  at::Tensor grad_x = at::zeros({B, D}, x.options());
  at::Tensor grad_ref = at::zeros({spec.exclude_self ? 0 : M, D}, x.options());
  if (B == 0 || M == 0) return {grad_x, grad_ref};

  const int64_t T = strip_rows(B, M, epi.strip_elems);
  at::Tensor S = at::empty({T, M}, x.options());
  const at::Tensor ref_t = ref.t();
  for (int64_t row0 = 0; row0 < B; row0 += T) {
    const int64_t t = std::min(T, B - row0);
    at::Tensor strip = S.narrow(0, 0, t);
    const at::Tensor x_rows = x.narrow(0, row0, t);
    at::mm_out(strip, x_rows, ref_t);
    epi.backward(strip, row0, labels, ref_labels, spec, row_stats, row_weights);
    accumulate_strip_grad(strip, x_rows, ref, row0, grad_x, grad_ref, spec.exclude_self);
  }
  return {grad_x, grad_ref};
}

}  // namespace structloss_fast
