// Every op schema of structloss_fast, written once. Kernels are registered per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd in structloss_fast/ops/*.py.
#include <torch/library.h>

TORCH_LIBRARY(structloss_fast, m) {
  // ---- pairwise family (structloss_fast/ops/pairwise.py) ----
  // Fused pairwise loss over anchors x (B, D) and references ref (M, D), both L2-normalized.
  // loss: PairLossKind (csrc/common/pairwise_math.h); params: that loss's parameters;
  // reduction: 0 none, 1 mean (over rows with a non-zero loss), 2 sum. With compute_grad
  // (mean/sum), grad_x / grad_ref hold the gradient of the reduced loss, computed during the
  // forward; otherwise they are empty. row_stats (B, 3) = (lse_pos, lse_neg, row_loss).
  m.def(
      "pairwise_loss(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, bool exclude_self, int loss, "
      "float[] params, int reduction, bool compute_grad) -> (Tensor loss, Tensor row_stats, Tensor grad_x, "
      "Tensor grad_ref)");
  // Recomputing backward: gradients of sum_i row_weights[i] * l_i.
  m.def(
      "pairwise_loss_backward(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor row_stats, "
      "Tensor row_weights, bool exclude_self, int loss, float[] params) -> (Tensor grad_x, Tensor grad_ref)");

  // ---- softmax family (structloss_fast/ops/softmax.py) ----
  // Encouraging Loss (cross-entropy at bonus_weight = 0) over the rows of logits (N, C), or over
  // margin-head cosines with a logit transform. transform: SoftmaxTransform
  // (csrc/common/softmax_math.h); params: log_end, bonus_weight, label_smoothing, eps, t0, t1;
  // reduction: 0 none, 1 mean (over the class weights of the non-ignored targets), 2 sum.
  // With compute_grad, grad_logits (N, C) holds each row's own gradient dl_i/dlogits_i (not yet
  // scaled by the reduction), written during the forward; otherwise it is (0, C).
  // row_stats (N, 7): see SoftmaxStat.
  m.def(
      "softmax_loss(Tensor logits, Tensor target, Tensor? class_weight, int ignore_index, int transform, "
      "float[] params, int reduction, bool compute_grad) -> (Tensor loss, Tensor row_stats, Tensor grad_logits)");
  // Recomputing backward: row_weights[i] * dl_i/dlogits from the saved row statistics.
  m.def(
      "softmax_loss_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor row_stats, "
      "Tensor row_weights, int ignore_index, int transform, float[] params) -> Tensor");
  // The same loss on logits = input @ weight^T + bias, in chunks of rows (and class tiles for
  // very large C) so that the (N, C) logits never exist. grad_mask: (input, weight, bias); with
  // any bit set (mean/sum only) the gradients of the reduced loss are accumulated during the
  // forward in float32 (float64 for float64). row_chunk / class_tile: 0 = automatic.
  m.def(
      "linear_softmax_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "int ignore_index, int transform, float[] params, int reduction, bool[3] grad_mask, int row_chunk, "
      "int class_tile) -> (Tensor loss, Tensor row_stats, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_softmax_loss_backward(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "Tensor row_stats, Tensor row_weights, int ignore_index, int transform, float[] params, bool[3] grad_mask, "
      "int row_chunk, int class_tile) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- sgld / jem family (structloss_fast/ops/sgld.py) ----

  // ---- cg / taskmet family (structloss_fast/ops/cg.py) ----

  // ---- seal family (structloss_fast/ops/seal.py) ----
}
