// CUDA conjugate gradients (the definition: structloss_fast/reference/cg.py; the per-column
// scalar logic is shared with the CPU kernels through csrc/common/taskmet_math.h).
//
// cg_dense: one thread block per system runs the system's whole CG loop in one kernel launch:
// A in shared memory when it fits (n <= ~100 in float32), the vectors x, r, p, Ap (z) and the
// per-column scalars in shared memory (global scratch when they do not fit), block-wide
// reductions for the inner products, no host round trip. Thread i computes row i of A^T p
// (= A p for the symmetric A CG requires), so the reads of A are coalesced / bank-conflict free.
//
// cg_update: one matrix-free iteration as five small kernels over (column, chunk of rows):
// curvature partial sums; step lengths; the x / r update with the partial sums of <r, r> and
// <r, z>; convergence and beta; the p update. Partial sums are combined in chunk order by one
// thread per column (deterministic, no atomics), and nothing is copied back to the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/taskmet_common.h"

namespace structloss_fast {
namespace {


constexpr int kMaxThreads = 256;
// Dynamic shared memory without the opt-in attribute: 48 KB per block, less the static `red`.
constexpr int kSmemBudget = 47 * 1024;

// Sum over the block of each thread's v; every thread gets the result. smem: >= 32 elements.
template <typename T>
__device__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // red may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  T r = red[0];
  for (int w = 1; w < n_warps; ++w) r += red[w];  // fixed order: deterministic
  return r;
}

template <typename T>
__device__ T block_dot(const T* a, const T* b, int64_t n, T* red) {
  T s = T(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += a[i] * b[i];
  return block_sum(s, red);
}

// y = A^T p + ridge p (row-major A): thread i reads column i of row j, consecutive over i.
template <typename T>
__device__ void block_symv(const T* __restrict__ A, int64_t n, const T* __restrict__ p, T* __restrict__ y, T ridge) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    T acc = ridge * p[i];
    for (int64_t j = 0; j < n; ++j) acc += A[j * n + i] * p[j];
    y[i] = acc;
  }
}

// The shared problem plus where the kernel keeps its scratch.
template <typename T>
struct DenseProblem : cg::DenseProblem<T> {
  // Scratch: in dynamic shared memory (use_smem) or in `work` (work_stride bytes per system).
  bool use_smem;
  bool a_in_smem;
  unsigned char* work;
  int64_t work_stride;
  int64_t t_bytes;  // bytes of the T arrays, rounded up to 8: the int64 / uint8 arrays follow
};

template <typename T>
__device__ T apply_precond(const DenseProblem<T>& pr, const T* M, const T* r, T* z, T* red) {
  const int64_t n = pr.n;
  if (pr.m_dense) {
    block_symv(M, n, r, z, T(0));
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) z[i] = M[i] * r[i];
  }
  __syncthreads();
  return block_dot(r, z, n, red);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) cg_dense_kernel(DenseProblem<T> pr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T red[32];
  const int64_t s = blockIdx.x;
  const int64_t n = pr.n, k = pr.k, nk = n * k;
  const bool has_m = pr.M != nullptr;
  unsigned char* base = pr.use_smem ? smem_raw : pr.work + s * pr.work_stride;
  T* X = reinterpret_cast<T*>(base);
  T* R = X + nk;
  T* P = R + nk;
  T* AP = P + nk;
  T* Z = has_m ? AP + nk : R;
  T* rz = (has_m ? Z : AP) + nk;
  T* tol = rz + k;
  T* rn = tol + k;
  T* Acache = rn + k;
  int64_t* it_count = reinterpret_cast<int64_t*>(base + pr.t_bytes);
  uint8_t* st = reinterpret_cast<uint8_t*>(it_count + k);
  const T nan = cg::quiet_nan<T>();

  const T* A = pr.A + s * pr.a_stride;
  if (pr.a_in_smem) {
    for (int64_t e = threadIdx.x; e < n * n; e += blockDim.x) Acache[e] = A[e];
    A = Acache;
  }
  const T* M = has_m ? pr.M + s * pr.m_stride : nullptr;
  const T* b = pr.b + s * nk;
  for (int64_t e = threadIdx.x; e < nk; e += blockDim.x) {
    const int64_t i = e / k, c = e % k;
    R[c * n + i] = b[e];
    X[c * n + i] = pr.x0 ? pr.x0[s * nk + e] : T(0);
  }
  __syncthreads();
  for (int64_t c = 0; c < k; ++c) {
    const T bnorm = sqrt(block_dot(R + c * n, R + c * n, n, red));
    const bool zero_b = bnorm == T(0);
    if (threadIdx.x == 0) {
      tol[c] = cg::tolerance(bnorm, pr.rtol, pr.atol);
      it_count[c] = 0;
    }
    T* x = X + c * n;
    T* r = R + c * n;
    if (pr.x0 != nullptr && !zero_b) {
      block_symv(A, n, x, AP + c * n, pr.ridge);
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) r[i] -= AP[c * n + i];
    }
    if (zero_b) {  // b = 0 returns x = 0 at once, whatever x0
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = r[i] = T(0);
    }
    __syncthreads();
    const T rr = block_dot(r, r, n, red);
    const T rnorm0 = sqrt(rr);
    __syncthreads();
    const uint8_t st0 = cg::initial_status(rnorm0, tol[c]);
    if (st0 == kBreakdown)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = nan;
    const T rz0 = has_m ? apply_precond(pr, M, r, Z + c * n, red) : rr;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) P[c * n + i] = Z[c * n + i];
    if (threadIdx.x == 0) {
      rn[c] = rnorm0;
      st[c] = st0;
      rz[c] = rz0;
    }
    __syncthreads();
  }

  for (int64_t it = 0; it < pr.maxiter; ++it) {
    bool any = false;
    for (int64_t c = 0; c < k; ++c) any = any || st[c] == kRunning;
    if (!any) break;  // uniform over the block: every thread reads the same statuses
    for (int64_t c = 0; c < k; ++c)
      if (st[c] == kRunning) block_symv(A, n, P + c * n, AP + c * n, pr.ridge);
    __syncthreads();
    for (int64_t c = 0; c < k; ++c) {
      if (st[c] != kRunning) continue;
      T* x = X + c * n;
      T* r = R + c * n;
      T* p = P + c * n;
      const T* ap = AP + c * n;
      const T pAp = block_dot(p, ap, n, red);
      uint8_t status = st[c];
      bool take;
      const T alpha = cg::step_length(rz[c], pAp, &status, &take);
      __syncthreads();  // everyone has read st[c] before thread 0 writes it
      if (!take) {
        if (threadIdx.x == 0) st[c] = status;
        __syncthreads();
        continue;
      }
      T part = T(0);
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        x[i] += alpha * p[i];
        const T ri = r[i] - alpha * ap[i];
        r[i] = ri;
        part += ri * ri;
      }
      const T rr = block_sum(part, red);
      const T rnorm = sqrt(rr);
      status = cg::status_after_step(rnorm, tol[c]);
      if (status == kBreakdown)
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[i] = nan;
      if (status == kRunning) {
        T* z = Z + c * n;
        __syncthreads();  // r complete before z = M r reads it
        const T rz_new = has_m ? apply_precond(pr, M, r, z, red) : rr;
        const T beta = cg::direction_coef(status, rz_new, rz[c]);
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p[i] = z[i] + beta * p[i];
        __syncthreads();  // everyone has read rz[c]
        if (threadIdx.x == 0) rz[c] = rz_new;
      }
      if (threadIdx.x == 0) {
        st[c] = status;
        rn[c] = rnorm;
        it_count[c] += 1;
      }
      __syncthreads();
    }
  }

  for (int64_t e = threadIdx.x; e < nk; e += blockDim.x) {
    const int64_t i = e / k, c = e % k;
    pr.x[s * nk + e] = X[c * n + i];
  }
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) cg::store_column(pr, s, c, it_count[c], rn[c], st[c]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cg_dense_cuda(const at::Tensor& A_in, const at::Tensor& b_in,
                                                                         const std::optional<at::Tensor>& x0_in,
                                                                         const std::optional<at::Tensor>& precond_in,
                                                                         double ridge, double rtol, double atol,
                                                                         int64_t maxiter) {
  c10::cuda::CUDAGuard guard(b_in.device());
  const cg::DenseCall c = cg::prepare_dense(A_in, b_in, x0_in, precond_in, maxiter);
  const int64_t S = c.S, n = c.n, k = c.k;
  const at::Tensor& M = c.M;
  if (S == 0 || k == 0) return {c.x, c.iters, c.rnorm, c.status};

  AT_DISPATCH_FLOATING_TYPES(c.b.scalar_type(), "cg_dense_cuda", [&] {
    using T = scalar_t;
    DenseProblem<T> pr;
    cg::fill_dense_problem<T>(pr, c, ridge, rtol, atol, maxiter);
    const int64_t vec = (M.defined() ? 5 : 4) * n * k + 3 * k;
    auto layout_bytes = [&](bool with_a) {  // (bytes of the T arrays, total bytes)
      const int64_t t_elems = vec + (with_a ? n * n : 0);
      const int64_t t_bytes = (t_elems * int64_t(sizeof(T)) + 7) / 8 * 8;
      return std::make_pair(t_bytes, t_bytes + 8 * k + k);
    };
    auto with_a = layout_bytes(true);
    auto without_a = layout_bytes(false);
    at::Tensor work;
    int64_t smem = 0;
    if (with_a.second <= kSmemBudget) {
      pr.use_smem = true;
      pr.a_in_smem = true;
      pr.t_bytes = with_a.first;
      smem = with_a.second;
      pr.work = nullptr;
      pr.work_stride = 0;
    } else {
      pr.a_in_smem = false;
      pr.t_bytes = without_a.first;
      pr.use_smem = without_a.second <= kSmemBudget;
      if (pr.use_smem) {
        smem = without_a.second;
        pr.work = nullptr;
        pr.work_stride = 0;
      } else {
        pr.work_stride = (without_a.second + 15) / 16 * 16;
        work = at::empty({S * pr.work_stride}, c.b.options().dtype(at::kByte));
        pr.work = work.data_ptr<uint8_t>();
      }
    }
    const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (n + 31) / 32 * 32)));
    cg_dense_kernel<T><<<static_cast<unsigned>(S), threads, smem, at::cuda::getCurrentCUDAStream()>>>(pr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.x, c.iters, c.rnorm, c.status};
}

// ---------------------------------------------------------------- matrix-free iteration

constexpr int kUpdThreads = 256;
constexpr int64_t kRowsPerChunk = 4096;

template <typename T>
struct UpdateArgs {
  T* x;
  T* r;
  T* p;
  const T* Ap;
  const T* d;
  int64_t n, k, nchunks;
  T* partial;  // (S * k, nchunks, 2)
  T* alpha;
  T* beta;
  uint8_t* flags;  // (S * k): bit 0 take, bit 1 continue, bit 2 breakdown
  T* rz;
  T* rnorm;
  const T* tol;
  int64_t* iters;
  uint8_t* status;
};

// Column j = s * k + c, element (s, i, c) at (s * n + i) * k + c. Grid: (columns, chunks).
template <typename T>
__global__ void __launch_bounds__(kUpdThreads) curvature_kernel(UpdateArgs<T> a) {
  __shared__ T red[32];
  const int64_t j = blockIdx.x, ch = blockIdx.y;
  const int64_t s = j / a.k, c = j % a.k;
  const int64_t i0 = ch * kRowsPerChunk, i1 = a.n < i0 + kRowsPerChunk ? a.n : i0 + kRowsPerChunk;
  T acc = T(0);
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t e = (s * a.n + i) * a.k + c;
    acc += a.p[e] * a.Ap[e];
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) a.partial[(j * a.nchunks + ch) * 2] = acc;
}

template <typename T>
__global__ void step_kernel(UpdateArgs<T> a, int64_t cols) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  T pAp = T(0);
  for (int64_t ch = 0; ch < a.nchunks; ++ch) pAp += a.partial[(j * a.nchunks + ch) * 2];
  uint8_t st = a.status[j];
  bool take;
  a.alpha[j] = cg::step_length(a.rz[j], pAp, &st, &take);
  a.status[j] = st;
  a.flags[j] = take ? 1 : 0;
}

template <typename T>
__global__ void __launch_bounds__(kUpdThreads) update_kernel(UpdateArgs<T> a) {
  __shared__ T red[32];
  const int64_t j = blockIdx.x, ch = blockIdx.y;
  if (!(a.flags[j] & 1)) return;  // uniform over the block
  const int64_t s = j / a.k, c = j % a.k;
  const int64_t i0 = ch * kRowsPerChunk, i1 = a.n < i0 + kRowsPerChunk ? a.n : i0 + kRowsPerChunk;
  const T al = a.alpha[j];
  T rr = T(0), rz = T(0);
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t e = (s * a.n + i) * a.k + c;
    a.x[e] += al * a.p[e];
    const T ri = a.r[e] - al * a.Ap[e];
    a.r[e] = ri;
    rr += ri * ri;
    rz += ri * (a.d ? a.d[s * a.n + i] * ri : ri);
  }
  rr = block_sum(rr, red);
  rz = block_sum(rz, red);
  if (threadIdx.x == 0) {
    a.partial[(j * a.nchunks + ch) * 2] = rr;
    a.partial[(j * a.nchunks + ch) * 2 + 1] = rz;
  }
}

template <typename T>
__global__ void converge_kernel(UpdateArgs<T> a, int64_t cols) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  if (!(a.flags[j] & 1)) {
    a.beta[j] = T(0);
    return;
  }
  T rr = T(0), rz = T(0);
  for (int64_t ch = 0; ch < a.nchunks; ++ch) {
    rr += a.partial[(j * a.nchunks + ch) * 2];
    rz += a.partial[(j * a.nchunks + ch) * 2 + 1];
  }
  const T rn = sqrt(rr);
  const uint8_t st = cg::status_after_step(rn, a.tol[j]);
  a.rnorm[j] = rn;
  a.iters[j] += 1;
  a.status[j] = st;
  uint8_t f = 1;
  if (st == kBreakdown) f |= 4;
  if (st == kRunning) {
    f |= 2;
    a.beta[j] = cg::direction_coef(st, rz, a.rz[j]);
    a.rz[j] = rz;
  } else {
    a.beta[j] = T(0);
  }
  a.flags[j] = f;
}

template <typename T>
__global__ void __launch_bounds__(kUpdThreads) direction_kernel(UpdateArgs<T> a) {
  const int64_t j = blockIdx.x, ch = blockIdx.y;
  const uint8_t f = a.flags[j];
  if (!(f & 6)) return;
  const int64_t s = j / a.k, c = j % a.k;
  const int64_t i0 = ch * kRowsPerChunk, i1 = a.n < i0 + kRowsPerChunk ? a.n : i0 + kRowsPerChunk;
  const T be = a.beta[j];
  const T nan = cg::quiet_nan<T>();
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t e = (s * a.n + i) * a.k + c;
    if (f & 4) {
      a.x[e] = nan;
    } else {
      const T z = a.d ? a.d[s * a.n + i] * a.r[e] : a.r[e];
      a.p[e] = z + be * a.p[e];
    }
  }
}

void cg_update_cuda(at::Tensor& x, at::Tensor& r, at::Tensor& p, const at::Tensor& Ap,
                    const std::optional<at::Tensor>& precond, at::Tensor& rz, at::Tensor& rnorm, const at::Tensor& tol,
                    at::Tensor& iters, at::Tensor& status) {
  const at::Tensor d = cg::check_update(x, r, p, Ap, precond, rz, rnorm, tol, iters, status);
  const int64_t S = x.size(0), n = x.size(1), k = x.size(2);
  const int64_t cols = S * k;
  if (cols == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t nchunks = std::max<int64_t>(1, (n + kRowsPerChunk - 1) / kRowsPerChunk);
  TORCH_CHECK(nchunks <= 65535, "cg_update: n too large for the CUDA kernels");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_cuda", [&] {
    using T = scalar_t;
    at::Tensor partial = at::zeros({cols, nchunks, 2}, x.options());
    at::Tensor coef = at::empty({2, cols}, x.options());
    at::Tensor flags = at::empty({cols}, x.options().dtype(at::kByte));
    UpdateArgs<T> a{x.data_ptr<T>(), r.data_ptr<T>(), p.data_ptr<T>(), Ap.data_ptr<T>(),
                    d.defined() ? d.data_ptr<T>() : nullptr, n, k, nchunks, partial.data_ptr<T>(),
                    coef.data_ptr<T>(), coef.data_ptr<T>() + cols, flags.data_ptr<uint8_t>(), rz.data_ptr<T>(),
                    rnorm.data_ptr<T>(), tol.data_ptr<T>(), iters.data_ptr<int64_t>(), status.data_ptr<uint8_t>()};
    const dim3 grid(static_cast<unsigned>(cols), static_cast<unsigned>(nchunks));
    const unsigned col_blocks = static_cast<unsigned>((cols + 255) / 256);
    curvature_kernel<T><<<grid, kUpdThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    step_kernel<T><<<col_blocks, 256, 0, stream>>>(a, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    update_kernel<T><<<grid, kUpdThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    converge_kernel<T><<<col_blocks, 256, 0, stream>>>(a, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    direction_kernel<T><<<grid, kUpdThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CUDA, m) {
  m.impl("cg_dense", &cg_dense_cuda);
  m.impl("cg_update", &cg_update_cuda);
}

}  // namespace structloss_fast
