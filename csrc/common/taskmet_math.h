// Per-column scalar logic of conjugate gradients, shared by the CPU and CUDA kernels (host and
// device). The vector sweeps live in csrc/cpu/cg.cpp and csrc/cuda/cg.cu; the definition they
// implement is structloss_fast/reference/cg.py (statuses, freezing, zero right-hand sides,
// negative curvature, non-finite residuals).
#pragma once

#include <cstdint>

#include "ids.h"
#include "math.h"

namespace structloss_fast {
namespace cg {

// One cg_dense call as the kernels see it: S systems of n unknowns and k right-hand sides,
// contiguous, the outputs allocated (csrc/common/taskmet_common.h fills it from the op's tensors).
template <typename T>
struct DenseProblem {
  const T* A;
  int64_t a_stride;  // 0 (one A for every system) or n * n
  const T* b;
  const T* x0;       // nullptr: x0 = 0
  const T* M;        // nullptr, diagonal (n per system) or dense (n * n per system)
  int64_t m_stride;
  bool m_dense;
  T ridge, rtol, atol;
  int64_t maxiter, n, k;
  T* x;
  int64_t* iters;
  T* rnorm;
  uint8_t* status;
};

// The per-column outputs of system s, column c: iterations, residual norm, status (CGStatus).
template <typename T>
SLF_HD void store_column(const DenseProblem<T>& pr, int64_t s, int64_t c, int64_t iters, T rnorm, uint8_t status) {
  pr.iters[s * pr.k + c] = iters;
  pr.rnorm[s * pr.k + c] = rnorm;
  pr.status[s * pr.k + c] = status;
}

template <typename T>
SLF_HD bool is_finite(T v) {
  // v - v is 0 for finite v and NaN for +-inf and NaN; works under -ffast-math-like flags too.
  return (v - v) == T(0);
}

template <typename T>
SLF_HD T quiet_nan() {
  return static_cast<T>(NAN);
}

// Status of a column after its set-up: b = 0 (bnorm == 0) is converged with x = 0 (the caller
// zeroes x and r), a non-finite initial residual is a breakdown (x becomes NaN), a small enough
// residual is converged at iteration 0.
template <typename T>
SLF_HD uint8_t initial_status(T rnorm, T tol) {
  if (!is_finite(rnorm)) return kBreakdown;
  if (rnorm <= tol) return kConverged;
  return kRunning;
}

template <typename T>
SLF_HD T tolerance(T bnorm, T rtol, T atol) {
  const T t = rtol * bnorm;
  // NaN bnorm gives a NaN tolerance: the residual is non-finite then and the column breaks down.
  return t > atol ? t : (t != t ? t : atol);
}

// Step length of a running column with curvature pAp = p^T A p. pAp <= 0 stops the column
// before the step (negative curvature): alpha = 0 and the status changes. A NaN pAp is taken
// (alpha NaN), so that the residual turns non-finite and the column breaks down with x = NaN.
template <typename T>
SLF_HD T step_length(T rz, T pAp, uint8_t* status, bool* take) {
  *take = false;
  if (*status != kRunning) return T(0);
  if (pAp <= T(0)) {
    *status = kNegativeCurvature;
    return T(0);
  }
  *take = true;
  return rz / pAp;
}

// After the x, r update of a column that took a step: its new residual norm decides.
template <typename T>
SLF_HD uint8_t status_after_step(T rnorm, T tol) {
  if (!is_finite(rnorm)) return kBreakdown;
  if (rnorm <= tol) return kConverged;
  return kRunning;
}

// beta = <r', z'> / <r, z> of a column that continues (0 for the others: p is frozen).
template <typename T>
SLF_HD T direction_coef(uint8_t status, T rz_new, T rz) {
  return status == kRunning ? rz_new / rz : T(0);
}

}  // namespace cg
}  // namespace structloss_fast
