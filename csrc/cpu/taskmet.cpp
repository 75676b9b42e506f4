// CPU conjugate gradients (the definition: structloss_fast/reference/cg.py).
//
// cg_dense: batched dense systems, in parallel over systems; each system runs its whole CG loop
// on one thread with A, x, r, p, Ap (and z) held in that core's cache, so there is no host
// round trip at all: a system stops as soon as its last column finishes. The symmetric
// matrix-vector product walks A four rows at a time (y += A[j:j+4]^T p[j:j+4]), a loop that
// auto-vectorizes without horizontal sums inside the AVX2 clone.
//
// cg_update: one matrix-free CG iteration, in place, for an operator applied outside (Ap = A p
// given). Three sweeps over fixed-size chunks of rows, in parallel over (system, chunk): the
// curvature p^T A p; the x / r update fused with <r, r> and <r, z> (diagonal M applied on the
// fly); the p update. Chunk partial sums are combined in chunk order, so the result does not
// depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/taskmet_common.h"

namespace structloss_fast {
namespace {

using cg::DenseProblem;

template <typename T>
SLF_HD T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = A^T p + ridge p for a row-major n x n A (= A p for the symmetric A that CG requires).
template <typename T>
SLF_HD void symv(const T* __restrict A, int64_t n, const T* __restrict p, T* __restrict y, T ridge) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = ridge * p[i];
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
    const T* __restrict a0 = A + j * n;
    const T* __restrict a1 = a0 + n;
    const T* __restrict a2 = a1 + n;
    const T* __restrict a3 = a2 + n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += (p0 * a0[i] + p1 * a1[i]) + (p2 * a2[i] + p3 * a3[i]);
  }
  for (; j < n; ++j) {
    const T pj = p[j];
    const T* __restrict a = A + j * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += pj * a[i];
  }
}

// Several columns (the running ones, listed in cols) against one A: each block of four rows of A
// is read once from L1/L2 for all of them.
template <typename T>
SLF_HD void symv_cols(const T* __restrict A, int64_t n, const T* P, T* Y, const int64_t* cols, int64_t ncols,
                      T ridge) {
  if (ncols == 1) {
    symv(A, n, P + cols[0] * n, Y + cols[0] * n, ridge);
    return;
  }
  for (int64_t q = 0; q < ncols; ++q) {
    const T* __restrict p = P + cols[q] * n;
    T* __restrict y = Y + cols[q] * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = ridge * p[i];
  }
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* __restrict a0 = A + j * n;
    const T* __restrict a1 = a0 + n;
    const T* __restrict a2 = a1 + n;
    const T* __restrict a3 = a2 + n;
    for (int64_t q = 0; q < ncols; ++q) {
      const T* __restrict p = P + cols[q] * n;
      T* __restrict y = Y + cols[q] * n;
      const T p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += (p0 * a0[i] + p1 * a1[i]) + (p2 * a2[i] + p3 * a3[i]);
    }
  }
  for (; j < n; ++j) {
    const T* __restrict a = A + j * n;
    for (int64_t q = 0; q < ncols; ++q) {
      const T pj = P[cols[q] * n + j];
      T* __restrict y = Y + cols[q] * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += pj * a[i];
    }
  }
}


// z = M r for one column, returning <r, z>.
template <typename T>
SLF_HD T apply_precond(const DenseProblem<T>& pr, const T* M, const T* __restrict r, T* __restrict z) {
  const int64_t n = pr.n;
  if (pr.m_dense) {
    symv(M, n, r, z, T(0));
    return dot(r, z, n);
  }
  T rz = T(0);
#pragma omp simd reduction(+ : rz)
  for (int64_t i = 0; i < n; ++i) {
    z[i] = M[i] * r[i];
    rz += r[i] * z[i];
  }
  return rz;
}

template <typename T>
SLF_CPU_MULTIVERSION void dense_solve_range(const DenseProblem<T>& pr, int64_t s_begin, int64_t s_end) {
  const int64_t n = pr.n, k = pr.k, nk = n * k;
  const bool has_m = pr.M != nullptr;
  std::vector<T> buf((has_m ? 5 : 4) * nk + 3 * k);
  T* X = buf.data();
  T* R = X + nk;
  T* P = R + nk;
  T* AP = P + nk;
  T* Z = has_m ? AP + nk : R;  // without M, z is r
  T* rz = (has_m ? Z : AP) + nk;
  T* tol = rz + k;
  T* rn = tol + k;
  std::vector<int64_t> cols(k), it_count(k);
  std::vector<uint8_t> st(k), zero_b(k);
  const T nan = cg::quiet_nan<T>();

  for (int64_t s = s_begin; s < s_end; ++s) {
    const T* A = pr.A + s * pr.a_stride;
    const T* M = has_m ? pr.M + s * pr.m_stride : nullptr;
    const T* b = pr.b + s * nk;
    // Columns are stored contiguously (column c at c * n) while the system is solved.
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < k; ++c) R[c * n + i] = b[i * k + c];
    for (int64_t c = 0; c < k; ++c) {
      const T bnorm = std::sqrt(dot(R + c * n, R + c * n, n));
      zero_b[c] = bnorm == T(0);
      tol[c] = cg::tolerance(bnorm, pr.rtol, pr.atol);
      cols[c] = c;
    }
    if (pr.x0 != nullptr) {
      const T* x0 = pr.x0 + s * nk;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < k; ++c) X[c * n + i] = x0[i * k + c];
      symv_cols(A, n, X, AP, cols.data(), k, pr.ridge);
#pragma omp simd
      for (int64_t e = 0; e < nk; ++e) R[e] -= AP[e];
    } else {
      std::fill(X, X + nk, T(0));
    }
    for (int64_t c = 0; c < k; ++c) {
      T* x = X + c * n;
      T* r = R + c * n;
      if (zero_b[c]) {  // b = 0 returns x = 0 at once, whatever x0
        std::fill(x, x + n, T(0));
        std::fill(r, r + n, T(0));
      }
      const T rr = dot(r, r, n);
      rn[c] = std::sqrt(rr);
      st[c] = cg::initial_status(rn[c], tol[c]);
      it_count[c] = 0;
      if (st[c] == kBreakdown) std::fill(x, x + n, nan);
      rz[c] = has_m ? apply_precond(pr, M, r, Z + c * n) : rr;
      std::copy(Z + c * n, Z + c * n + n, P + c * n);
    }

    for (int64_t it = 0; it < pr.maxiter; ++it) {
      int64_t ncols = 0;
      for (int64_t c = 0; c < k; ++c)
        if (st[c] == kRunning) cols[ncols++] = c;
      if (ncols == 0) break;
      symv_cols(A, n, P, AP, cols.data(), ncols, pr.ridge);
      for (int64_t q = 0; q < ncols; ++q) {
        const int64_t c = cols[q];
        T* __restrict x = X + c * n;
        T* __restrict r = R + c * n;
        T* __restrict p = P + c * n;
        const T* __restrict ap = AP + c * n;
        bool take;
        const T alpha = cg::step_length(rz[c], dot(p, ap, n), &st[c], &take);
        if (!take) continue;
        T rr = T(0);
#pragma omp simd reduction(+ : rr)
        for (int64_t i = 0; i < n; ++i) {
          x[i] += alpha * p[i];
          r[i] -= alpha * ap[i];
          rr += r[i] * r[i];
        }
        it_count[c] += 1;
        rn[c] = std::sqrt(rr);
        st[c] = cg::status_after_step(rn[c], tol[c]);
        if (st[c] == kBreakdown) std::fill(x, x + n, nan);
        if (st[c] != kRunning) continue;
        T* __restrict z = Z + c * n;
        const T rz_new = has_m ? apply_precond(pr, M, r, z) : rr;
        const T beta = cg::direction_coef(st[c], rz_new, rz[c]);
        rz[c] = rz_new;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) p[i] = z[i] + beta * p[i];
      }
    }

    T* x_out = pr.x + s * nk;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < k; ++c) x_out[i * k + c] = X[c * n + i];
    for (int64_t c = 0; c < k; ++c) cg::store_column(pr, s, c, it_count[c], rn[c], st[c]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cg_dense_cpu(const at::Tensor& A_in, const at::Tensor& b_in,
                                                                        const std::optional<at::Tensor>& x0_in,
                                                                        const std::optional<at::Tensor>& precond_in,
                                                                        double ridge, double rtol, double atol,
                                                                        int64_t maxiter) {
  const cg::DenseCall c = cg::prepare_dense(A_in, b_in, x0_in, precond_in, maxiter);
  if (c.S == 0 || c.k == 0) return {c.x, c.iters, c.rnorm, c.status};
  AT_DISPATCH_FLOATING_TYPES(c.b.scalar_type(), "cg_dense_cpu", [&] {
    DenseProblem<scalar_t> pr;
    cg::fill_dense_problem(pr, c, ridge, rtol, atol, maxiter);
    // One system per task: the per-system cost (many matrix-vector products) dwarfs scheduling.
    at::parallel_for(0, c.S, 1, [&](int64_t begin, int64_t end) { dense_solve_range<scalar_t>(pr, begin, end); });
  });
  return {c.x, c.iters, c.rnorm, c.status};
}

// ---------------------------------------------------------------- matrix-free iteration

constexpr int64_t kChunkElems = 4096;

template <typename T>
struct UpdateArgs {
  T* x;
  T* r;
  T* p;
  const T* Ap;
  const T* d;  // diagonal preconditioner (S, n) or nullptr
  int64_t S, n, k, rows_per_chunk, nchunks;
  T* partial;  // (S, nchunks, 2, k)
  const T* alpha;
  const uint8_t* take;
  const T* beta;
  const uint8_t* cont;
  const uint8_t* bad;
};

template <typename T>
SLF_CPU_MULTIVERSION void curvature_chunk(const UpdateArgs<T>& a, int64_t s, int64_t ch) {
  const int64_t i0 = ch * a.rows_per_chunk, i1 = std::min(a.n, i0 + a.rows_per_chunk), k = a.k;
  const T* p = a.p + s * a.n * k;
  const T* ap = a.Ap + s * a.n * k;
  T* out = a.partial + (s * a.nchunks + ch) * 2 * k;
  if (k == 1) {
    out[0] = dot(p + i0, ap + i0, i1 - i0);
    return;
  }
  std::fill(out, out + k, T(0));
  for (int64_t i = i0; i < i1; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < k; ++c) out[c] += p[i * k + c] * ap[i * k + c];
  }
}

template <typename T>
SLF_CPU_MULTIVERSION void update_chunk(const UpdateArgs<T>& a, int64_t s, int64_t ch) {
  const int64_t i0 = ch * a.rows_per_chunk, i1 = std::min(a.n, i0 + a.rows_per_chunk), k = a.k;
  const int64_t off = s * a.n * k;
  T* __restrict x = a.x + off;
  T* __restrict r = a.r + off;
  const T* __restrict p = a.p + off;
  const T* __restrict ap = a.Ap + off;
  const T* __restrict d = a.d ? a.d + s * a.n : nullptr;
  T* out = a.partial + (s * a.nchunks + ch) * 2 * k;
  const T* alpha = a.alpha + s * k;
  const uint8_t* take = a.take + s * k;
  if (k == 1) {
    if (!take[0]) return;
    const T al = alpha[0];
    T rr = T(0), rz = T(0);
    if (d) {
#pragma omp simd reduction(+ : rr, rz)
      for (int64_t i = i0; i < i1; ++i) {
        x[i] += al * p[i];
        const T ri = r[i] - al * ap[i];
        r[i] = ri;
        rr += ri * ri;
        rz += ri * (d[i] * ri);
      }
    } else {
#pragma omp simd reduction(+ : rr)
      for (int64_t i = i0; i < i1; ++i) {
        x[i] += al * p[i];
        const T ri = r[i] - al * ap[i];
        r[i] = ri;
        rr += ri * ri;
      }
      rz = rr;
    }
    out[0] = rr;
    out[1] = rz;
    return;
  }
  T* rr = out;
  T* rz = out + k;
  std::fill(out, out + 2 * k, T(0));
  for (int64_t i = i0; i < i1; ++i) {
    const T di = d ? d[i] : T(1);
#pragma omp simd
    for (int64_t c = 0; c < k; ++c) {
      const int64_t e = i * k + c;
      const bool t = take[c] != 0;
      const T xn = x[e] + alpha[c] * p[e];
      const T rn = r[e] - alpha[c] * ap[e];
      x[e] = t ? xn : x[e];
      r[e] = t ? rn : r[e];
      rr[c] += t ? rn * rn : T(0);
      rz[c] += t ? rn * (di * rn) : T(0);
    }
  }
}

template <typename T>
SLF_CPU_MULTIVERSION void direction_chunk(const UpdateArgs<T>& a, int64_t s, int64_t ch) {
  const int64_t i0 = ch * a.rows_per_chunk, i1 = std::min(a.n, i0 + a.rows_per_chunk), k = a.k;
  const int64_t off = s * a.n * k;
  T* __restrict x = a.x + off;
  const T* __restrict r = a.r + off;
  T* __restrict p = a.p + off;
  const T* __restrict d = a.d ? a.d + s * a.n : nullptr;
  const T* beta = a.beta + s * k;
  const uint8_t* cont = a.cont + s * k;
  const uint8_t* bad = a.bad + s * k;
  const T nan = cg::quiet_nan<T>();
  if (k == 1) {
    if (bad[0]) std::fill(x + i0, x + i1, nan);
    if (!cont[0]) return;
    const T be = beta[0];
    if (d) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) p[i] = d[i] * r[i] + be * p[i];
    } else {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) p[i] = r[i] + be * p[i];
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T di = d ? d[i] : T(1);
#pragma omp simd
    for (int64_t c = 0; c < k; ++c) {
      const int64_t e = i * k + c;
      const T z = d ? di * r[e] : r[e];
      p[e] = cont[c] ? z + beta[c] * p[e] : p[e];
      x[e] = bad[c] ? nan : x[e];
    }
  }
}

template <typename T, typename F>
void for_chunks(const UpdateArgs<T>& a, const F& fn) {
  const int64_t work = a.S * a.nchunks;
  // Grain: about at::internal::GRAIN_SIZE (32768) elements per task, as PyTorch's own elementwise
  // ops split their work.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, a.rows_per_chunk * a.k));
  at::parallel_for(0, work, grain, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) fn(a, w / a.nchunks, w % a.nchunks);
  });
}

void cg_update_cpu(at::Tensor& x, at::Tensor& r, at::Tensor& p, const at::Tensor& Ap,
                   const std::optional<at::Tensor>& precond, at::Tensor& rz, at::Tensor& rnorm, const at::Tensor& tol,
                   at::Tensor& iters, at::Tensor& status) {
  const at::Tensor d = cg::check_update(x, r, p, Ap, precond, rz, rnorm, tol, iters, status);
  const int64_t S = x.size(0), n = x.size(1), k = x.size(2);
  if (S == 0 || k == 0) return;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / k);
  const int64_t nchunks = n == 0 ? 0 : (n + rows_per_chunk - 1) / rows_per_chunk;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_cpu", [&] {
    using T = scalar_t;
    const int64_t cols = S * k;
    at::Tensor partial = at::zeros({S, std::max<int64_t>(nchunks, 1), 2, k}, x.options());
    std::vector<T> alpha(cols), beta(cols);
    std::vector<uint8_t> take(cols), cont(cols), bad(cols);
    UpdateArgs<T> a{x.data_ptr<T>(), r.data_ptr<T>(), p.data_ptr<T>(), Ap.data_ptr<T>(),
                    d.defined() ? d.data_ptr<T>() : nullptr, S, n, k, rows_per_chunk, nchunks,
                    partial.data_ptr<T>(), alpha.data(), take.data(), beta.data(), cont.data(), bad.data()};
    T* rz_p = rz.data_ptr<T>();
    T* rn_p = rnorm.data_ptr<T>();
    const T* tol_p = tol.data_ptr<T>();
    int64_t* it_p = iters.data_ptr<int64_t>();
    uint8_t* st_p = status.data_ptr<uint8_t>();
    const T* part = partial.data_ptr<T>();
    auto column_sum = [&](int64_t s, int64_t c, int64_t which) {
      T acc = T(0);
      for (int64_t ch = 0; ch < nchunks; ++ch) acc += part[((s * nchunks + ch) * 2 + which) * k + c];
      return acc;
    };

    for_chunks(a, [](const UpdateArgs<T>& aa, int64_t s, int64_t ch) { curvature_chunk<T>(aa, s, ch); });
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t j = s * k + c;
        bool tk;
        alpha[j] = cg::step_length(rz_p[j], column_sum(s, c, 0), &st_p[j], &tk);
        take[j] = tk;
      }
    for_chunks(a, [](const UpdateArgs<T>& aa, int64_t s, int64_t ch) { update_chunk<T>(aa, s, ch); });
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t j = s * k + c;
        bad[j] = 0;
        cont[j] = 0;
        beta[j] = T(0);
        if (!take[j]) continue;
        const T rn = std::sqrt(column_sum(s, c, 0));
        rn_p[j] = rn;
        it_p[j] += 1;
        st_p[j] = cg::status_after_step(rn, tol_p[j]);
        bad[j] = st_p[j] == kBreakdown;
        if (st_p[j] != kRunning) continue;
        const T rz_new = column_sum(s, c, 1);
        beta[j] = cg::direction_coef(st_p[j], rz_new, rz_p[j]);
        rz_p[j] = rz_new;
        cont[j] = 1;
      }
    for_chunks(a, [](const UpdateArgs<T>& aa, int64_t s, int64_t ch) { direction_chunk<T>(aa, s, ch); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("cg_dense", &cg_dense_cpu);
  m.impl("cg_update", &cg_update_cpu);
}

}  // namespace structloss_fast
