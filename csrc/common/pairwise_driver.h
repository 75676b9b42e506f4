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

struct PairwiseEpilogue {
  // Fills rows [row0, row0 + S.size(0)) of row_stats (B x kNumPairStats) from the strip S.
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

// Returns (row_stats, grad_x, grad_ref). With grad_mode > 0, grad_x (terms, B, D) holds for
// each term k the gradient of sum_i term_k,i (the unit-weight row sum), and so does grad_ref
// (terms, M, D) for kGradXRef unless ref_is_x; otherwise they are empty (0, B, D) / (0, M, D).
// On CPU, a strip whose gradient is sparse is accumulated from its non-zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const PairwiseSpec& spec, int64_t grad_mode, const PairwiseEpilogue& epi);

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

// STRUCTLOSS_FAST_PAIRWISE_EPILOGUE=aten makes the ops use kAtenEpilogue on every device (the
// tests run the CUDA backend's ATen path on CPU this way); unset or "kernel": the device's own.
bool aten_epilogue_forced();

}  // namespace structloss_fast
