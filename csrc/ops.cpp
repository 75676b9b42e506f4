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

  // ---- sgld / jem family (structloss_fast/ops/sgld.py) ----

  // ---- cg / taskmet family (structloss_fast/ops/cg.py) ----

  // ---- seal family (structloss_fast/ops/seal.py) ----
  // Fused sample-and-score noise-contrastive loss of a SEAL energy with unary potentials
  // unary (B, L) and global term c2^T softplus(C1 y + b1), C1 = global_weight (H, L):
  // draws num_samples = K Bernoulli(probs) label vectors per example from the 64-bit seed
  // (Philox4x32-10; or reads them from samples (B, K, L)), z_k = s(y_k) - [use_logq] log q(y_k)
  // with the gold labels at k = 0, loss_b = LSE_k z_k - z_0. reduction: 0 none, 1 mean, 2 sum.
  // stats (B, K + 2) = (z_0 .. z_K, LSE). With compute_grad (mean/sum) the grad outputs hold
  // the gradient of the reduced loss (probs and labels get none); otherwise they are empty.
  m.def(
      "seal_nce_loss(Tensor unary, Tensor probs, Tensor labels, Tensor global_weight, Tensor global_bias, "
      "Tensor global_out, Tensor seed, Tensor? samples, int num_samples, bool use_logq, int reduction, "
      "bool compute_grad) -> (Tensor loss, Tensor stats, Tensor grad_unary, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_out)");
  // Recomputing backward (samples redrawn from the seed): gradients of sum_b row_weights[b] * loss_b.
  m.def(
      "seal_nce_loss_backward(Tensor unary, Tensor probs, Tensor labels, Tensor global_weight, "
      "Tensor global_bias, Tensor global_out, Tensor seed, Tensor? samples, int num_samples, bool use_logq, "
      "Tensor stats, Tensor row_weights) -> (Tensor grad_unary, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_out)");
  // The samples seal_nce_loss draws for this seed, (B, K, L) in probs' dtype (for inspection and tests).
  m.def("seal_bernoulli(Tensor probs, Tensor seed, int num_samples) -> Tensor");
}
