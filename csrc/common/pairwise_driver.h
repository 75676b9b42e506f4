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

// What an epilogue reads besides its strip: the labels, and the rows' squared norms (for the
// distances computed from g, pair_distance).
struct PairwiseRows {
  at::Tensor labels, ref_labels;  // (B,), (M,); contiguous, one integer dtype
  at::Tensor x_sq, ref_sq;        // (B,), (M,); contiguous, x's dtype
};

struct PairwiseEpilogue {
  // Fills rows [row0, row0 + S.size(0)) of row_stats (B x kNumPairStats) from the strip S (its
  // pair values, spec.value). With want_grad, overwrites S with d term0_i / d v_ij (unit
  // weight; zero for anchors that pair_loss_row_counted excludes).
  void (*forward)(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, bool want_grad,
                  at::Tensor& row_stats);
  // Overwrites S with sum_k w_ik d term_k,i / d v_ij, from the saved statistics; row_weights (B, terms).
  void (*backward)(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                   const at::Tensor& row_stats, const at::Tensor& row_weights);
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

// The symmetric engine (references = the anchors): strip S = x[row0:row0+t] x[row0:]^T holds
// every pair (i, j), i < j, of its rows once, and its epilogue uses it for both anchor sides:
// the strip's rows over all of its columns (the anchor itself excluded) and the later anchors
// (columns c >= t) over the strip's rows. A forward + backward then costs about two
// B x B x D products instead of three (one-pass losses: 1.5).
struct SymmetricEpilogue {
  int64_t acc_cols;  // per-anchor partial statistics
  bool two_pass;     // statistics complete before any gradient (log-sum-exp losses)
  bool sparse_grad;  // its gradient can be sparse (else the non-zero count is not even taken)
  // Adds the strip's pairs to acc (B x acc_cols; zeros = nothing yet), both anchor sides. With
  // want_grad (one-pass losses only), also overwrites S with the unit-weight gradient, as
  // `gradient` would.
  void (*accumulate)(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                     at::Tensor& acc, bool want_grad);
  // row_stats (B x kNumPairStats) from acc, as the strip epilogue's forward writes them.
  void (*finish)(const at::Tensor& acc, const PairwiseRows& rows, const PairwiseSpec& spec, at::Tensor& row_stats);
  // Overwrites S with sum_k w_ik d term_k,i / d v_ij + (c >= t) sum_k w_jk d term_k,j / d v_ji.
  // Two-pass losses read their complete row_stats; row_weights (B, terms).
  void (*gradient)(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                   const at::Tensor& row_stats, const at::Tensor& row_weights);
  int64_t strip_elems;
};

// STRUCTLOSS_FAST_PAIRWISE_SYMMETRIC: unset or "1" = the symmetric engine where it applies,
// "0" = never (the tests run both).
bool symmetric_engine_enabled();

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_symmetric_forward_driver(
    const at::Tensor& x, const at::Tensor& labels, const PairwiseSpec& spec, int64_t grad_mode,
    const SymmetricEpilogue& epi);

std::tuple<at::Tensor, at::Tensor> pairwise_symmetric_backward_driver(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& row_stats, const at::Tensor& row_weights,
    const PairwiseSpec& spec, const SymmetricEpilogue& epi);

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
