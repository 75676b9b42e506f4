// The device-independent part of the fused pairwise engine: it walks the anchors in strips of
// T rows, forms each T x M similarity strip with one GEMM, hands the strip to a device
// epilogue that turns it into per-anchor statistics (and, when gradients are wanted, into the
// gradient dl/ds in place), and accumulates the input gradients with two more GEMMs.
// Memory is O(B*D + T*M): the B x M similarity matrix never exists.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pairwise_math.h"

namespace structloss_fast {

// Grad modes of the forward: what it computes besides the loss (mean/sum, one-term losses).
enum GradMode : int64_t { kGradNone = 0, kGradX = 1, kGradXRef = 2 };

struct PairwiseEpilogue {
  // Fills rows [row0, row0 + S.size(0)) of row_stats (B x kNumRowStats) from the strip S.
  // With want_grad, overwrites S with d term0_i / d s_ij (unit weight; zero for anchors that
  // pair_loss_row_counted excludes).
  void (*forward)(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                  const PairwiseSpec& spec, bool want_grad, at::Tensor& row_stats);
  // Overwrites S with sum_k w_ik d term_k,i / d s_ij, from the saved statistics; row_weights (B, terms).
  void (*backward)(at::Tensor& S, int64_t row0, const at::Tensor& labels, const at::Tensor& ref_labels,
                   const PairwiseSpec& spec, const at::Tensor& row_stats, const at::Tensor& row_weights);
  // Elements allowed in one similarity strip (T * M).
  int64_t strip_elems;
};

// Returns (loss, row_stats, grad_x, grad_ref). loss is 0-d for mean/sum and (B, terms) for
// none. With grad_mode > 0 (mean/sum of a one-term loss or of contrastive), grad_x (and
// grad_ref for kGradXRef unless ref_is_x) hold the gradient of the reduced loss; otherwise they
// are empty (0, D). On CPU, a strip whose gradient is sparse is accumulated from its non-zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const PairwiseSpec& spec, int64_t reduction, int64_t grad_mode, const PairwiseEpilogue& epi);

// Returns (grad_x, grad_ref) of sum_ik row_weights[i, k] * term_k,i; grad_ref is empty unless
// ref_grad and not ref_is_x.
std::tuple<at::Tensor, at::Tensor> pairwise_backward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, const PairwiseSpec& spec, bool ref_grad,
    const PairwiseEpilogue& epi);

// Checks of the op's own invariants (the Python entry point validates user input first).
void check_pairwise_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                           const at::Tensor& ref_labels, const PairwiseSpec& spec);

PairwiseSpec make_pairwise_spec(int64_t loss, at::ArrayRef<double> params, int64_t self_offset, bool ref_is_x);

// The epilogue written with ATen ops, for any device: the CUDA backend's path for the losses
// without a dedicated CUDA kernel (triplet mining among them), and testable on CPU.
extern const PairwiseEpilogue kAtenEpilogue;

}  // namespace structloss_fast
