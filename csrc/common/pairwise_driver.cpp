#include "pairwise_driver.h"

#include <algorithm>
#include <limits>

#include "pairwise_math.h"

namespace structloss_fast {

PairwiseSpec make_pairwise_spec(int64_t loss, at::ArrayRef<double> params, int64_t self_offset, bool ref_is_x) {
  TORCH_CHECK(loss >= 0 && loss < kNumPairLosses, "structloss_fast: unknown pairwise loss id ", loss);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == pair_loss_params(loss), "structloss_fast: pairwise loss ",
              loss, " takes ", pair_loss_params(loss), " parameters, got ", params.size());
  TORCH_CHECK(self_offset >= -1, "structloss_fast: self_offset must be -1 or a reference index, got ", self_offset);
  PairwiseSpec spec{loss, {0.0, 0.0, 0.0}, self_offset, ref_is_x};
  std::copy(params.begin(), params.end(), spec.p);
  return spec;
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
  TORCH_CHECK(!spec.ref_is_x || x.size(0) == ref.size(0), "structloss_fast: ref_is_x needs ref of x's length");
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

// grad_x[rows] += G @ ref; grad_ref += G^T @ x[rows] (into grad_x when ref is x; skipped
// when grad_ref is not wanted).
void accumulate_strip_grad(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, int64_t row0,
                           at::Tensor& grad_x, at::Tensor& grad_ref, bool ref_is_x) {
  grad_x.narrow(0, row0, G.size(0)).addmm_(G, ref);
  if (ref_is_x) {
    grad_x.addmm_(G.t(), x_rows);
  } else if (grad_ref.size(0) > 0) {
    grad_ref.addmm_(G.t(), x_rows);
  }
}

struct Prepared {
  at::Tensor x, labels, ref, ref_labels;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
                 const PairwiseSpec& spec) {
  Prepared p;
  p.x = x.contiguous();
  p.labels = labels.contiguous();
  p.ref = spec.ref_is_x ? p.x : ref.contiguous();
  p.ref_labels = spec.ref_is_x ? p.labels : ref_labels.contiguous();
  return p;
}

// Runs the strips: S = x[rows] @ ref^T, then `epilogue(strip, row0)`, then, if `grads`, the
// gradient GEMMs on the rewritten strip.
template <typename Fn>
void for_each_strip(const Prepared& p, const PairwiseEpilogue& epi, bool grads, at::Tensor& grad_x,
                    at::Tensor& grad_ref, bool ref_is_x, Fn&& epilogue) {
  const int64_t B = p.x.size(0), M = p.ref.size(0);
  const int64_t T = strip_rows(B, M, epi.strip_elems);
  at::Tensor S = at::empty({T, M}, p.x.options());
  const at::Tensor ref_t = p.ref.t();
  for (int64_t row0 = 0; row0 < B; row0 += T) {
    const int64_t t = std::min(T, B - row0);
    at::Tensor strip = S.narrow(0, 0, t);
    const at::Tensor x_rows = p.x.narrow(0, row0, t);
    at::mm_out(strip, x_rows, ref_t);
    epilogue(strip, row0);
    if (grads) accumulate_strip_grad(strip, x_rows, p.ref, row0, grad_x, grad_ref, ref_is_x);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const PairwiseSpec& spec, int64_t reduction, int64_t grad_mode, const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              "structloss_fast: unknown reduction id ", reduction);
  TORCH_CHECK(grad_mode >= kGradNone && grad_mode <= kGradXRef, "structloss_fast: unknown grad_mode ", grad_mode);
  TORCH_CHECK(grad_mode == kGradNone || (reduction != kReductionNone && spec.terms() == 1),
              "structloss_fast: the forward computes gradients only for mean/sum of one-term losses");
  const Prepared p = prepare(x_in, labels_in, ref_in, ref_labels_in, spec);
  const int64_t B = p.x.size(0), M = p.ref.size(0), D = p.x.size(1);
  const bool grads = grad_mode != kGradNone;

  at::Tensor row_stats = at::zeros({B, kNumRowStats}, p.x.options());
  at::Tensor grad_x = at::zeros({grads ? B : 0, D}, p.x.options());
  at::Tensor grad_ref = at::zeros({grad_mode == kGradXRef && !spec.ref_is_x ? M : 0, D}, p.x.options());

  if (B > 0 && M > 0) {
    for_each_strip(p, epi, grads, grad_x, grad_ref, spec.ref_is_x, [&](at::Tensor& strip, int64_t row0) {
      epi.forward(strip, row0, p.labels, p.ref_labels, spec, grads, row_stats);
    });
  }

  const at::Tensor gate = pair_loss_gated(spec.loss)
                              ? at::logical_and(row_stats.select(1, kNumPos).sum().gt(0),
                                                row_stats.select(1, kNumNeg).sum().gt(0))
                                    .to(p.x.scalar_type())
                              : at::ones({}, p.x.options());
  at::Tensor loss;
  if (reduction == kReductionNone) {
    loss = row_stats.narrow(1, kSum0, 1).clone();
    if (spec.terms() == 2) loss = at::cat({loss, row_stats.narrow(1, kSum1, 1)}, 1);
    loss.mul_(gate);
  } else {
    at::Tensor scale0 = gate;
    loss = row_stats.select(1, kSum0).sum();
    if (reduction == kReductionMean) scale0 = gate / row_stats.select(1, kCount0).sum().clamp_min(1);
    loss = loss * scale0;
    if (spec.terms() == 2) {
      at::Tensor s1 = row_stats.select(1, kSum1).sum() * gate;
      if (reduction == kReductionMean) s1 = s1 / row_stats.select(1, kCount1).sum().clamp_min(1);
      loss = loss + s1;
    }
    if (grads) {
      grad_x.mul_(scale0);
      grad_ref.mul_(scale0);
    }
  }
  return {loss, row_stats, grad_x, grad_ref};
}

std::tuple<at::Tensor, at::Tensor> pairwise_backward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const at::Tensor& row_stats_in, const at::Tensor& row_weights_in, const PairwiseSpec& spec, bool ref_grad,
    const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  const Prepared p = prepare(x_in, labels_in, ref_in, ref_labels_in, spec);
  const int64_t B = p.x.size(0), M = p.ref.size(0), D = p.x.size(1);
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == B && row_stats_in.size(1) == kNumRowStats,
              "structloss_fast: row_stats must be (B, ", kNumRowStats, ")");
  TORCH_CHECK(row_weights_in.dim() == 2 && row_weights_in.size(0) == B && row_weights_in.size(1) == spec.terms(),
              "structloss_fast: row_weights must be (B, ", spec.terms(), ")");
  const at::Tensor row_stats = row_stats_in.to(p.x.scalar_type()).contiguous();
  const at::Tensor row_weights = row_weights_in.to(p.x.scalar_type()).contiguous();

  at::Tensor grad_x = at::zeros({B, D}, p.x.options());
  at::Tensor grad_ref = at::zeros({ref_grad && !spec.ref_is_x ? M : 0, D}, p.x.options());
  if (B == 0 || M == 0) return {grad_x, grad_ref};
  for_each_strip(p, epi, true, grad_x, grad_ref, spec.ref_is_x, [&](at::Tensor& strip, int64_t row0) {
    epi.backward(strip, row0, p.labels, p.ref_labels, spec, row_stats, row_weights);
  });
  return {grad_x, grad_ref};
}

}  // namespace structloss_fast
