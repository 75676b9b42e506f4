// Every op schema of structloss_fast, written once. Kernels are registered per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd in structloss_fast/ops/*.py.
#include <torch/library.h>

TORCH_LIBRARY(structloss_fast, m) {
  // ---- pairwise family (structloss_fast/ops/pairwise.py) ----
  // Fused pairwise loss over anchors x (B, D) and references ref (M, D), both L2-normalized.
  // self_offset: -1, or anchor i is reference (self_offset + i) mod M (that pair is excluded);
  // ref_is_x: ref is x itself (its gradient folds into grad_x). loss: PairLossKind
  // (csrc/common/pairwise_math.h); params: that loss's parameters; reduction: 0 none (per
  // anchor and term, (B, terms)), 1 mean, 2 sum (as the loss's PML reducer). grad_mode: 0 none,
  // 1 grad_x, 2 grad_x and grad_ref of the reduced loss, computed during the forward (mean/sum
  // of one-term losses); otherwise they are empty. row_stats (B, 8): see RowStat. epilogue:
  // "auto" | "kernel" | "aten" (the device-independent epilogue; for tests).
  m.def(
      "pairwise_loss(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, int self_offset, bool ref_is_x, "
      "int loss, float[] params, int reduction, int grad_mode, str epilogue=\"auto\") -> (Tensor loss, "
      "Tensor row_stats, Tensor grad_x, Tensor grad_ref)");
  // Recomputing backward: gradients of sum_ik row_weights[i, k] * term_k,i.
  m.def(
      "pairwise_loss_backward(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor row_stats, "
      "Tensor row_weights, int self_offset, bool ref_is_x, int loss, float[] params, bool ref_grad, "
      "str epilogue=\"auto\") -> (Tensor grad_x, Tensor grad_ref)");

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
  // One fused SGLD step, in place on x (csrc/common/sgld_math.h):
  //   y = x + step_coef * clamp(grad, grad_clamp); y += noise_coef * eps (before or after the
  //   optional clamp of y to x_clamp, by noise_after_clamp).
  // eps is `noise` when given, else standard normals generated in the kernel (none when
  // noise_coef is 0) by Philox keyed from `generator` (the device's default generator when
  // None): on CPU one 64-bit draw per call, on CUDA the generator's Philox (seed, offset), so
  // torch.manual_seed reproduces the step and it can be captured in a CUDA graph. philox =
  // [seed, counter] overrides the generator (tests). grad_clamp / x_clamp: [] or [lo, hi].
  m.def(
      "sgld_step_(Tensor(a!) x, Tensor grad, Tensor? noise, float step_coef, float noise_coef, float[] grad_clamp, "
      "float[] x_clamp, bool noise_after_clamp, Generator? generator, int[] philox) -> ()",
      {at::Tag::nondeterministic_seeded});

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

  // ---- imitation family (structloss_fast/imitation/_ops.py) ----
  // Layer-imitation loss over L layers in one pass (docs/spec/imitation.md): student[i] and
  // teacher[i] have the same shape; every tensor has one floating dtype and lives on one device.
  // layer_losses[i] = scales[i] * sum_j (student[i]_j - teacher[i]_j)^2 (sums of squares
  // accumulated in float64, the terms rounded once to the inputs' dtype), loss = sum_i of the
  // float64 terms, rounded once. scales[i] = w_i / D_i carries the weight and the reduction.
  m.def(
      "layer_imitation_loss(Tensor[] student, Tensor[] teacher, float[] scales) -> (Tensor loss, "
      "Tensor layer_losses)");
  // grad_student[i] = coef[i] * (student[i] - teacher[i]) and grad_teacher[i] = -grad_student[i]
  // (coef (L,) float64 or float32), each written only where grad_mask says so (else empty (0,)).
  m.def(
      "layer_imitation_loss_backward(Tensor[] student, Tensor[] teacher, Tensor coef, bool[2] grad_mask) -> "
      "(Tensor[] grad_student, Tensor[] grad_teacher)");
}
