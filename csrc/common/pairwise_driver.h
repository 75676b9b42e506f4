// The device-independent part of the fused pairwise engine: it walks the anchors in strips of
// T rows, forms each T x M similarity strip with one GEMM, hands the strip to a device
// epilogue that turns it into per-row statistics (and, when gradients are wanted, into the
// gradient dl/ds in place), and accumulates the input gradients with two more GEMMs.
// Memory is O(B*D + T*M): the B x M similarity matrix never exists.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace structloss_fast {

struct PairwiseSpec {
  int64_t loss;       // PairLossKind
  double p0, p1;      // loss parameters, in schema order (circle/unified: m, gamma)
  bool exclude_self;  // ref is x itself: the diagonal is no pair, and grad_ref folds into grad_x
};

struct PairwiseEpilogue {
  // Fills rows [row0, row0 + S.size(0)) of row_stats (B x kNumRowStats) from the strip S.
  // With want_grad, overwrites S with d l_i / d s_ij for every row that counts (row_counts),
  // and with zeros for rows that do not.
  void (*forward)(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                  const PairwiseSpec& spec, bool want_grad, at::Tensor& row_stats);
  // Overwrites S with w_i * d l_i / d s_ij, recomputed from the saved row statistics.
  void (*backward)(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                   const PairwiseSpec& spec, const at::Tensor& row_stats, const at::Tensor& row_weights);
  // Elements allowed in one similarity strip (T * M).
  int64_t strip_elems;
};

// Returns (loss, row_stats, grad_x, grad_ref). loss is 0-d for mean/sum and (B,) for none.
// With compute_grad (mean/sum only), grad_x and grad_ref hold the gradients of the reduced
// loss; otherwise they are empty (0, D). With spec.exclude_self, grad_ref is always empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const PairwiseSpec& spec, int64_t reduction, bool compute_grad, const PairwiseEpilogue& epi);

// Returns (grad_x, grad_ref) for per-row upstream weights row_weights (B,).
std::tuple<at::Tensor, at::Tensor> pairwise_backward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, const PairwiseSpec& spec,
    const PairwiseEpilogue& epi);

// Checks of the op's own invariants (the Python entry point validates user input first).
void check_pairwise_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                           const at::Tensor& ref_labels, const PairwiseSpec& spec);

PairwiseSpec make_pairwise_spec(int64_t loss, at::ArrayRef<double> params, bool exclude_self);

}  // namespace structloss_fast
