// Host-side checks and set-up of the CG ops, shared by the CPU and CUDA kernels. The Python entry
// point (structloss_fast/cg.py) validates user input first, with messages that name the argument;
// these checks guard direct calls of torch.ops.structloss_fast.cg_dense / cg_update.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "taskmet_math.h"

namespace structloss_fast {
namespace cg {

// A cg_dense call, checked: contiguous inputs (x0 / M undefined when absent) and the allocated
// outputs x (S, n, k), iterations, residual_norm and status (S, k).
struct DenseCall {
  at::Tensor A, b, x0, M;
  bool m_dense = false;
  int64_t S = 0, n = 0, k = 0;
  at::Tensor x, iters, rnorm, status;
};

DenseCall prepare_dense(const at::Tensor& A_in, const at::Tensor& b_in, const std::optional<at::Tensor>& x0_in,
                        const std::optional<at::Tensor>& precond_in, int64_t maxiter);

template <typename T>
void fill_dense_problem(DenseProblem<T>& pr, const DenseCall& c, double ridge, double rtol, double atol,
                        int64_t maxiter) {
  pr.A = c.A.data_ptr<T>();
  pr.a_stride = c.A.size(0) == 1 ? 0 : c.n * c.n;
  pr.b = c.b.data_ptr<T>();
  pr.x0 = c.x0.defined() ? c.x0.data_ptr<T>() : nullptr;
  pr.M = c.M.defined() ? c.M.data_ptr<T>() : nullptr;
  pr.m_stride = (!c.M.defined() || c.M.size(0) == 1) ? 0 : (c.m_dense ? c.n * c.n : c.n);
  pr.m_dense = c.m_dense;
  pr.ridge = static_cast<T>(ridge);
  pr.rtol = static_cast<T>(rtol);
  pr.atol = static_cast<T>(atol);
  pr.maxiter = maxiter;
  pr.n = c.n;
  pr.k = c.k;
  pr.x = c.x.data_ptr<T>();
  pr.iters = c.iters.data_ptr<int64_t>();
  pr.rnorm = c.rnorm.data_ptr<T>();
  pr.status = c.status.data_ptr<uint8_t>();
}

// Checks a cg_update call's tensors; returns the diagonal preconditioner (undefined if none).
at::Tensor check_update(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                        const std::optional<at::Tensor>& precond, const at::Tensor& rz, const at::Tensor& rnorm,
                        const at::Tensor& tol, const at::Tensor& iters, const at::Tensor& status);

}  // namespace cg
}  // namespace structloss_fast
