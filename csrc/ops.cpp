// Every op schema of structloss_fast, written once. Kernels are registered per device in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; fake kernels and autograd in
// structloss_fast/<family>/_ops.py, which also defines each loss op's Triton twin
// (`<op>_triton`, the same schema, Triton kernels) from the schema written here.
//
// The loss ops take no reduction: they return per-row statistics (the columns are enums of
// csrc/common/ids.h) and, on request, the gradients of the unit-weight sum of the row losses,
// computed in the same pass. The Python glue reduces the statistics, and autograd hands the
// recomputing backward ops the gradient of each row's loss ("row weights").
#include <torch/library.h>

TORCH_LIBRARY(structloss_fast, m) {
  // ---- pairwise family (structloss_fast/pairwise/_ops.py) ----
  // Fused pairwise statistics over anchors x (B, D) and references ref (M, D), both
  // L2-normalized. self_offset: -1, or anchor i is reference (self_offset + i) mod M (that pair
  // is excluded); ref_is_x: ref is x itself (its gradient folds into grad_x). loss: PairLossKind;
  // params: that loss's parameters (ids.h). row_stats (B, kNumPairStats): PairStat columns.
  // grad_mode (PairGradMode): with kGradX, grad_x (terms, B, D) holds for each term k the
  // gradient of sum_i term_k,i; with kGradXRef also grad_ref (terms, M, D) unless ref_is_x;
  // otherwise (0, B, D) / (0, M, D). Test switches are environment variables, not arguments:
  // STRUCTLOSS_FAST_PAIRWISE_EPILOGUE=aten, STRUCTLOSS_FAST_PAIRWISE_SPARSE=0|1,
  // STRUCTLOSS_FAST_PAIRWISE_SYMMETRIC=0|1, STRUCTLOSS_FAST_PAIRWISE_STRIP_ROWS=n. params may end
  // with the PairExtParam block (a distance's pair values, a fused miner).
  m.def(
      "pairwise_loss(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, int self_offset, bool ref_is_x, "
      "int loss, float[] params, int grad_mode) -> (Tensor row_stats, Tensor grad_x, Tensor grad_ref)");
  // Recomputing backward: gradients of sum_ik row_weights[i, k] * term_k,i (row_weights (B, terms)).
  m.def(
      "pairwise_loss_backward(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor row_stats, "
      "Tensor row_weights, int self_offset, bool ref_is_x, int loss, float[] params, bool ref_grad) -> "
      "(Tensor grad_x, Tensor grad_ref)");
  // The same with a parameter per anchor, row_params (B,) (MarginLoss's beta; the losses of
  // pair_loss_has_row_params in csrc/common/pairwise_math.h, which pairwise_loss refuses).
  // Its gradient is not an output: the statistics hold each anchor's d term / d row_param.
  m.def(
      "pairwise_loss_rowparam(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor row_params, "
      "int self_offset, bool ref_is_x, int loss, float[] params, int grad_mode) -> "
      "(Tensor row_stats, Tensor grad_x, Tensor grad_ref)");
  m.def(
      "pairwise_loss_rowparam_backward(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor row_params, "
      "Tensor row_stats, Tensor row_weights, int self_offset, bool ref_is_x, int loss, float[] params, "
      "bool ref_grad) -> (Tensor grad_x, Tensor grad_ref)");

  // ---- softmax family (structloss_fast/softmax/_ops.py) ----
  // Encouraging Loss (cross-entropy at bonus_weight = 0) of each row of logits (N, C), or of
  // margin-head cosines with a logit transform. transform: SoftmaxTransform; params: SoftmaxParam
  // order (ids.h). target: (N,) int64 class indices, or (N, C) class probabilities (identity
  // transform only; row loss sum_j w_j ((1 - ls) t_j + ls / C) f_j, ignore_index unused).
  // row_stats (N, kNumSoftmaxStats): SoftmaxStat columns, the row loss among them.
  // With compute_grad, grad_logits (N, C) holds each row's own gradient dl_i/dlogits_i, written
  // during the forward; otherwise it is (0, C).
  m.def(
      "softmax_loss(Tensor logits, Tensor target, Tensor? class_weight, int ignore_index, int transform, "
      "float[] params, bool compute_grad) -> (Tensor row_stats, Tensor grad_logits)");
  // Recomputing backward: row_weights[i] * dl_i/dlogits from the saved row statistics.
  m.def(
      "softmax_loss_backward(Tensor logits, Tensor target, Tensor? class_weight, Tensor row_stats, "
      "Tensor row_weights, int ignore_index, int transform, float[] params) -> Tensor");
  // The same rows on logits = input @ weight^T + bias, in chunks of rows (and class tiles for
  // very large C) so that the (N, C) logits never exist. grad_mask: (input, weight, bias); with
  // any bit set the gradients of the unit-weight sum of the row losses are accumulated during
  // the forward in float32 (float64 for float64). row_chunk / class_tile: 0 = automatic.
  m.def(
      "linear_softmax_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "int ignore_index, int transform, float[] params, bool[3] grad_mask, int row_chunk, int class_tile) -> "
      "(Tensor row_stats, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_softmax_loss_backward(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "Tensor row_stats, Tensor row_weights, int ignore_index, int transform, float[] params, bool[3] grad_mask, "
      "int row_chunk, int class_tile) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Classes with `group` centers each (weight (group C, H), group-major: center k of class c is row k C + c):
  // the similarities of input (N, H) to the centers are pooled per class (pool: SoftmaxPool,
  // pool_param its parameter) into (N, C) values, which the row kernel takes with its transform
  // and params as softmax_loss (SubCenterArcFace: max + ArcFace; SoftTriple: soft average + CosFace).
  // In row chunks: the N x C group similarities never exist. grad_mask: (input, weight).
  m.def(
      "pooled_linear_softmax_loss(Tensor input, Tensor weight, Tensor target, Tensor? class_weight, "
      "int ignore_index, int transform, float[] params, int pool, int group, float pool_param, bool[2] grad_mask) -> "
      "(Tensor row_stats, Tensor grad_input, Tensor grad_weight)");
  m.def(
      "pooled_linear_softmax_loss_backward(Tensor input, Tensor weight, Tensor target, Tensor? class_weight, "
      "Tensor row_stats, Tensor row_weights, int ignore_index, int transform, float[] params, int pool, int group, "
      "float pool_param, bool[2] grad_mask) -> (Tensor grad_input, Tensor grad_weight)");
  // ProxyAnchor (Kim et al. 2020) per-class statistics (C, kNumProxyAnchorStats) of embeddings x
  // (N, D) and proxies (C, D), both L2-normalized; params (alpha, margin). Per proxy c,
  // log(1 + sum over its rows of exp(-alpha (s_ic - margin))) and log(1 + sum over the other rows
  // of exp(alpha (s_ic + margin))), in row chunks with an online log-sum-exp per column.
  m.def("proxy_anchor_loss(Tensor x, Tensor proxies, Tensor labels, float[] params) -> Tensor class_stats");
  // Gradients of sum_c class_weights[c, 0] pos_term_c + class_weights[c, 1] neg_term_c
  // (class_weights (C, 2)), recomputed chunk by chunk. grad_mask: (x, proxies).
  m.def(
      "proxy_anchor_loss_backward(Tensor x, Tensor proxies, Tensor labels, Tensor class_stats, "
      "Tensor class_weights, float[] params, bool[2] grad_mask) -> (Tensor grad_x, Tensor grad_proxies)");

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

  // ---- taskmet family: conjugate gradients (structloss_fast/taskmet/_ops.py) ----
  // Batched dense conjugate gradients, the whole loop in one kernel per system. A (SA, n, n)
  // symmetric, SA in {1, S} (1: shared by every system); b (S, n, k); x0 None or (S, n, k);
  // precond None, (SP, n) (diagonal of M, z = M r) or (SP, n, n) (dense M), SP in {1, S}.
  // Solves (A + ridge I) x = b per column to ||r|| <= max(rtol ||b||, atol). Outputs x (S, n, k),
  // iterations (S, k) int64, residual_norm (S, k), status (S, k) uint8 (CGStatus, ids.h).
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

  // ---- seal family (structloss_fast/seal/_ops.py) ----
  // Fused sample-and-score noise-contrastive loss of a SEAL energy with unary potentials
  // unary (B, L) and global term c2^T softplus(C1 y + b1), C1 = global_weight (H, L):
  // draws num_samples = K Bernoulli(probs) label vectors per example from the 64-bit seed
  // (Philox4x32-10; or reads them from samples (B, K, L)), z_k = s(y_k) - [use_logq] log q(y_k)
  // with the gold labels at k = 0; example b's loss is LSE_k z_k - z_0. stats (B, K + 2) =
  // (z_0 .. z_K, LSE). With compute_grad the grad outputs hold the gradients of the unit-weight
  // sum of the example losses (probs and labels get none); otherwise they are empty.
  m.def(
      "seal_nce_loss(Tensor unary, Tensor probs, Tensor labels, Tensor global_weight, Tensor global_bias, "
      "Tensor global_out, Tensor seed, Tensor? samples, int num_samples, bool use_logq, bool compute_grad) -> "
      "(Tensor stats, Tensor grad_unary, Tensor grad_weight, Tensor grad_bias, Tensor grad_out)");
  // Recomputing backward (samples redrawn from the seed): gradients of sum_b row_weights[b] * loss_b.
  m.def(
      "seal_nce_loss_backward(Tensor unary, Tensor probs, Tensor labels, Tensor global_weight, "
      "Tensor global_bias, Tensor global_out, Tensor seed, Tensor? samples, int num_samples, bool use_logq, "
      "Tensor stats, Tensor row_weights) -> (Tensor grad_unary, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_out)");
  // The samples seal_nce_loss draws for this seed, (B, K, L) in probs' dtype (for inspection and tests).
  m.def("seal_bernoulli(Tensor probs, Tensor seed, int num_samples) -> Tensor");

  // ---- imitation family (structloss_fast/imitation/_ops.py) ----
  // Layer-imitation statistics over L layers in one pass (docs/spec/imitation.md): student[i] and
  // teacher[i] have the same shape; every tensor has one floating dtype and lives on one device.
  // Returns the per-layer sums of squared differences sum_j (student[i]_j - teacher[i]_j)^2, (L,)
  // float64 (accumulated in float64); the Python glue weights and reduces them.
  m.def("layer_imitation_loss(Tensor[] student, Tensor[] teacher) -> Tensor layer_sq_sums");
  // grad_student[i] = coef[i] * (student[i] - teacher[i]) and grad_teacher[i] = -grad_student[i]
  // (coef (L,) float64 or float32), each written only where grad_mask says so (else empty (0,)).
  m.def(
      "layer_imitation_loss_backward(Tensor[] student, Tensor[] teacher, Tensor coef, bool[2] grad_mask) -> "
      "(Tensor[] grad_student, Tensor[] grad_teacher)");
}
