#include "taskmet_common.h"

#include <initializer_list>

namespace structloss_fast {
namespace cg {

DenseCall prepare_dense(const at::Tensor& A_in, const at::Tensor& b_in, const std::optional<at::Tensor>& x0_in,
                        const std::optional<at::Tensor>& precond_in, int64_t maxiter) {
  TORCH_CHECK(b_in.dim() == 3, "cg_dense: b must be (S, n, k)");
  DenseCall c;
  c.S = b_in.size(0);
  c.n = b_in.size(1);
  c.k = b_in.size(2);
  const int64_t S = c.S, n = c.n;
  TORCH_CHECK(A_in.dim() == 3 && (A_in.size(0) == 1 || A_in.size(0) == S) && A_in.size(1) == n && A_in.size(2) == n,
              "cg_dense: A must be (1 or S, n, n)");
  TORCH_CHECK(A_in.scalar_type() == b_in.scalar_type(), "cg_dense: A and b differ in dtype");
  TORCH_CHECK(maxiter >= 0, "cg_dense: maxiter must be >= 0");
  c.A = A_in.contiguous();
  c.b = b_in.contiguous();
  if (x0_in.has_value()) {
    TORCH_CHECK(x0_in->sizes() == b_in.sizes() && x0_in->scalar_type() == b_in.scalar_type(),
                "cg_dense: x0 must be like b");
    c.x0 = x0_in->contiguous();
  }
  if (precond_in.has_value()) {
    const at::Tensor& M = *precond_in;
    c.m_dense = M.dim() == 3;
    TORCH_CHECK(M.dim() == (c.m_dense ? 3 : 2) && (M.size(0) == 1 || M.size(0) == S) && M.size(1) == n &&
                    (!c.m_dense || M.size(2) == n),
                "cg_dense: precond must be (1 or S, n) or (1 or S, n, n)");
    TORCH_CHECK(M.scalar_type() == b_in.scalar_type(), "cg_dense: precond and b differ in dtype");
    c.M = M.contiguous();
  }
  c.x = at::empty_like(c.b);
  c.iters = at::empty({S, c.k}, c.b.options().dtype(at::kLong));
  c.rnorm = at::empty({S, c.k}, c.b.options());
  c.status = at::empty({S, c.k}, c.b.options().dtype(at::kByte));
  return c;
}

at::Tensor check_update(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                        const std::optional<at::Tensor>& precond, const at::Tensor& rz, const at::Tensor& rnorm,
                        const at::Tensor& tol, const at::Tensor& iters, const at::Tensor& status) {
  TORCH_CHECK(x.dim() == 3, "cg_update: x must be (S, n, k)");
  const int64_t S = x.size(0), n = x.size(1), k = x.size(2);
  for (const at::Tensor* t : {&x, &r, &p, &Ap}) {
    TORCH_CHECK(t->sizes() == x.sizes(), "cg_update: x, r, p and Ap must have one shape");
    TORCH_CHECK(t->is_contiguous(), "cg_update: x, r, p and Ap must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "cg_update: x, r, p and Ap must have one dtype");
  }
  for (const at::Tensor* t : {&rz, &rnorm, &tol}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == S && t->size(1) == k && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "cg_update: rz, residual_norm and tol must be contiguous (S, k) in x's dtype");
  }
  TORCH_CHECK(iters.dim() == 2 && iters.size(0) == S && iters.size(1) == k && iters.is_contiguous() &&
                  iters.scalar_type() == at::kLong,
              "cg_update: iterations must be contiguous (S, k) int64");
  TORCH_CHECK(status.dim() == 2 && status.size(0) == S && status.size(1) == k && status.is_contiguous() &&
                  status.scalar_type() == at::kByte,
              "cg_update: status must be contiguous (S, k) uint8");
  if (!precond.has_value()) return at::Tensor();
  TORCH_CHECK(precond->dim() == 2 && precond->size(0) == S && precond->size(1) == n && precond->is_contiguous() &&
                  precond->scalar_type() == x.scalar_type(),
              "cg_update: precond must be a contiguous (S, n) diagonal in x's dtype");
  return *precond;
}

}  // namespace cg
}  // namespace structloss_fast
