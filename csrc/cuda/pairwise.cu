// CUDA backend of the fused pairwise engine. The strip driver (csrc/common/pairwise_driver.cpp)
// forms each T x M similarity strip with cuBLAS and calls an epilogue: for the two-set losses
// (Circle, unified, multi-similarity) the kernels below, one thread block per anchor row with
// block-wide max / sum reductions and the per-pair math shared with the CPU kernels
// (csrc/common/pairwise_math.h); for the others, the ATen epilogue (pairwise_aten.cpp). The
// Triton backend is the fully fused GPU path; this one trades the strip's memory for cuBLAS
// GEMMs, covers every loss (triplet mining included) and serves where Triton is not installed.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/pairwise_driver.h"
#include "../common/pairwise_math.h"

namespace structloss_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T block_reduce(T v, T* smem, bool is_max) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? (o > v ? o : v) : v + o;
  }
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x / 32;
  T r = smem[0];
  for (int w = 1; w < n_warps; ++w) r = is_max ? (smem[w] > r ? smem[w] : r) : r + smem[w];
  return r;
}

template <typename T, typename L, typename Logits, typename Combine>
__global__ void twoset_forward_kernel(T* __restrict__ S, int64_t M, int64_t row0, const L* __restrict__ labels,
                                      const L* __restrict__ ref_labels, PairwiseSpec spec, Logits lg, Combine combine,
                                      bool row_counted, bool want_grad, T* __restrict__ stats) {
  __shared__ T smem[kThreads / 32];
  const int64_t r = blockIdx.x, i = row0 + r;
  T* s = S + r * M;
  const L li = labels[i];
  const int64_t self_j = self_column(spec, i, M);

  T max_p = neg_inf<T>(), max_n = neg_inf<T>(), cnt_p = 0, cnt_n = 0;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T sj = s[j];
    const bool same = ref_labels[j] == li, pos = same && j != self_j;
    const T a = same ? lg.pos(sj) : lg.neg(sj);
    if (pos && a > max_p) max_p = a;
    if (!same && a > max_n) max_n = a;
    cnt_p += pos ? T(1) : T(0);
    cnt_n += same ? T(0) : T(1);
  }
  max_p = block_reduce(max_p, smem, true);
  max_n = block_reduce(max_n, smem, true);
  cnt_p = block_reduce(cnt_p, smem, false);
  cnt_n = block_reduce(cnt_n, smem, false);

  T sum_p = 0, sum_n = 0;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T sj = s[j];
    const bool same = ref_labels[j] == li, pos = same && j != self_j;
    if (pos) sum_p += exp_(lg.pos(sj) - max_p);
    if (!same) sum_n += exp_(lg.neg(sj) - max_n);
  }
  sum_p = block_reduce(sum_p, smem, false);
  sum_n = block_reduce(sum_n, smem, false);

  const T lse_p = cnt_p > 0 ? max_p + log_(sum_p) : neg_inf<T>();
  const T lse_n = cnt_n > 0 ? max_n + log_(sum_n) : neg_inf<T>();
  const TwoSetResult<T> res = combine(lse_p, lse_n, cnt_p > 0, cnt_n > 0);
  const bool counts = row_counted ? row_counts(res.loss) : true;
  if (threadIdx.x == 0) {
    T* st = stats + i * kNumPairStats;
    st[kPairAux0] = lse_p;
    st[kPairAux1] = lse_n;
    st[kPairSum0] = res.loss;
    st[kPairCount0] = counts ? T(1) : T(0);
    st[kPairNumPos] = cnt_p;
    st[kPairNumNeg] = cnt_n;
  }
  if (!want_grad) return;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T sj = s[j];
    const bool same = ref_labels[j] == li, pos = same && j != self_j;
    T g = 0;
    if (counts && pos) g = res.dlse_pos * exp_(lg.pos(sj) - lse_p) * lg.pos_grad(sj);
    if (counts && !same) g = res.dlse_neg * exp_(lg.neg(sj) - lse_n) * lg.neg_grad(sj);
    s[j] = g;
  }
}

template <typename T, typename L, typename Logits, typename Combine>
__global__ void twoset_backward_kernel(T* __restrict__ S, int64_t M, int64_t row0, const L* __restrict__ labels,
                                       const L* __restrict__ ref_labels, PairwiseSpec spec, Logits lg, Combine combine,
                                       bool row_counted, const T* __restrict__ stats, const T* __restrict__ weights) {
  const int64_t r = blockIdx.x, i = row0 + r;
  T* s = S + r * M;
  const L li = labels[i];
  const int64_t self_j = self_column(spec, i, M);
  const T* st = stats + i * kNumPairStats;
  const T lse_p = st[kPairAux0], lse_n = st[kPairAux1];
  const T w = weights[i];
  const bool active = w != T(0) && (!row_counted || st[kPairCount0] != T(0));
  const TwoSetResult<T> res = combine(lse_p, lse_n, st[kPairNumPos] > 0, st[kPairNumNeg] > 0);
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T sj = s[j];
    const bool same = ref_labels[j] == li, pos = same && j != self_j;
    T g = 0;
    if (active && pos) g = w * res.dlse_pos * exp_(lg.pos(sj) - lse_p) * lg.pos_grad(sj);
    if (active && !same) g = w * res.dlse_neg * exp_(lg.neg(sj) - lse_n) * lg.neg_grad(sj);
    s[j] = g;
  }
}

template <typename T>
struct JointCombine {
  __device__ TwoSetResult<T> operator()(T lp, T ln, bool hp, bool hn) const { return combine_joint(lp, ln, hp, hn); }
};

template <typename T>
struct SeparateCombine {
  T inv_alpha, inv_beta;
  __device__ TwoSetResult<T> operator()(T lp, T ln, bool, bool) const {
    return combine_separate(lp, ln, inv_alpha, inv_beta);
  }
};

bool has_cuda_kernel(int64_t loss) { return loss == kCircle || loss == kUnified || loss == kMultiSimilarity; }

// fn(T, L, logits, combine, row_counted) for the two-set losses.
template <typename Fn>
void dispatch(const at::Tensor& S, const at::Tensor& labels, const PairwiseSpec& spec, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "structloss_fast_pairwise_cuda", [&] {
    using T = scalar_t;
    const T p0 = static_cast<T>(spec.p[0]), p1 = static_cast<T>(spec.p[1]), p2 = static_cast<T>(spec.p[2]);
    auto with_labels = [&](auto l0) {
      using L = decltype(l0);
      if (spec.loss == kCircle) {
        fn(T(0), L(0), CircleLogits<T>(p0, p1), JointCombine<T>{}, true);
      } else if (spec.loss == kUnified) {
        fn(T(0), L(0), UnifiedLogits<T>(p0, p1), JointCombine<T>{}, true);
      } else {
        fn(T(0), L(0), MultiSimilarityLogits<T>(p0, p1, p2), SeparateCombine<T>{T(1) / p0, T(1) / p1}, false);
      }
    };
    if (labels.scalar_type() == at::kInt) {
      with_labels(int32_t(0));
    } else {
      with_labels(int64_t(0));
    }
  });
}

void cuda_forward(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, bool want_grad,
                  at::Tensor& row_stats) {
  const at::Tensor& labels = rows.labels;
  const at::Tensor& ref_labels = rows.ref_labels;
  if (S.size(0) == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(S, labels, spec, [&](auto t0, auto l0, auto lg, auto combine, bool row_counted) {
    using T = decltype(t0);
    using L = decltype(l0);
    twoset_forward_kernel<T, L, decltype(lg), decltype(combine)><<<S.size(0), kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(), spec, lg, combine,
        row_counted, want_grad, row_stats.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cuda_backward(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                   const at::Tensor& row_stats, const at::Tensor& row_weights) {
  const at::Tensor& labels = rows.labels;
  const at::Tensor& ref_labels = rows.ref_labels;
  if (S.size(0) == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor w0 = row_weights.select(1, 0).contiguous();
  dispatch(S, labels, spec, [&](auto t0, auto l0, auto lg, auto combine, bool row_counted) {
    using T = decltype(t0);
    using L = decltype(l0);
    twoset_backward_kernel<T, L, decltype(lg), decltype(combine)><<<S.size(0), kThreads, 0, stream>>>(
        S.data_ptr<T>(), S.size(1), row0, labels.data_ptr<L>(), ref_labels.data_ptr<L>(), spec, lg, combine,
        row_counted, row_stats.data_ptr<T>(), w0.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// 256 MiB of float32 per strip: GPU GEMMs want tall strips.
constexpr int64_t kCudaStripElems = int64_t(1) << 26;

const PairwiseEpilogue kCudaEpilogue{&cuda_forward, &cuda_backward, kCudaStripElems};

// The dedicated kernel where one exists (two-set losses), else the ATen epilogue.
const PairwiseEpilogue& pick(int64_t loss) {
  return (has_cuda_kernel(loss) && !aten_epilogue_forced()) ? kCudaEpilogue : kAtenEpilogue;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    int64_t self_offset, bool ref_is_x, int64_t loss, at::ArrayRef<double> params, int64_t grad_mode) {
  const c10::cuda::CUDAGuard guard(x.device());
  const PairwiseSpec spec = make_pairwise_spec(loss, params, self_offset, ref_is_x);
  TORCH_CHECK(spec.miner == kMinerNone, "structloss_fast: fused miners run on the CPU backend only");
  return pairwise_forward_driver(x, labels, ref, ref_labels, spec, grad_mode, pick(loss));
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_backward_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    const at::Tensor& row_stats, const at::Tensor& row_weights, int64_t self_offset, bool ref_is_x, int64_t loss,
    at::ArrayRef<double> params, bool ref_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  const PairwiseSpec spec = make_pairwise_spec(loss, params, self_offset, ref_is_x);
  TORCH_CHECK(spec.miner == kMinerNone, "structloss_fast: fused miners run on the CPU backend only");
  return pairwise_backward_driver(x, labels, ref, ref_labels, row_stats, row_weights, spec, ref_grad, pick(loss));
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CUDA, m) {
  m.impl("pairwise_loss", &pairwise_loss_cuda);
  m.impl("pairwise_loss_backward", &pairwise_loss_backward_cuda);
}

}  // namespace structloss_fast
