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
  // Batched dense conjugate gradients, the whole loop in one kernel per system. A (SA, n, n)
  // symmetric, SA in {1, S} (1: shared by every system); b (S, n, k); x0 None or (S, n, k);
  // precond None, (SP, n) (diagonal of M, z = M r) or (SP, n, n) (dense M), SP in {1, S}.
  // Solves (A + ridge I) x = b per column to ||r|| <= max(rtol ||b||, atol). Outputs x (S, n, k),
  // iterations (S, k) int64, residual_norm (S, k), status (S, k) uint8 (csrc/common/cg_math.h).
  m.def(
      "cg_dense(Tensor A, Tensor b, Tensor? x0, Tensor? precond, float ridge, float rtol, float atol, "
      "int maxiter) -> (Tensor x, Tensor iterations, Tensor residual_norm, Tensor status)");
  // One matrix-free CG iteration of every running column, in place, given Ap = A p: the two
  // inner products, the x / r / p updates, the (diagonal) preconditioner and the per-column
  // convergence test in one op, without a host synchronisation. x, r, p, Ap (S, n, k);
  // precond None or (S, n) (diagonal of M); rz, residual_norm, tol (S, k); iterations (S, k)
  // int64; status (S, k) uint8.
  m.def(
      "cg_update(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Ap, Tensor? precond, Tensor(d!) rz, "
      "Tensor(e!) residual_norm, Tensor tol, Tensor(f!) iterations, Tensor(g!) status) -> ()");

  // ---- seal family (structloss_fast/ops/seal.py) ----
}
