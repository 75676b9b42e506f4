// CUDA kernel of the fused SGLD step (structloss_fast::sgld_step_): one pass over x, the noise
// generated in registers from Philox keyed by the CUDA generator's (seed, offset), taken with
// philox_cuda_state, so torch.manual_seed reproduces the step and the launch can be captured
// in a CUDA graph (under capture the seed and offset are read on the device). Same element ->
// Philox mapping and the same update arithmetic (csrc/common/jem_math.h) as the CPU kernel:
// one thread per Philox block of a tile, so each of its P normals is written by a warp to
// consecutive addresses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "../common/jem_common.h"
#include "../common/jem_math.h"

namespace structloss_fast {
namespace sgld {
namespace {

constexpr int kThreads = static_cast<int>(kTileBlocks);  // one thread per Philox block of a tile

struct PhiloxSource {
  at::PhiloxCudaState state;  // from the generator, when !explicit_key
  uint64_t seed, ctr;         // explicit key (tests)
  bool explicit_key;
};

__device__ __forceinline__ void philox_key(const PhiloxSource& src, uint64_t& seed, uint64_t& ctr) {
  if (src.explicit_key) {
    seed = src.seed;
    ctr = src.ctr;
  } else {
    const auto seeds = at::cuda::philox::unpack(src.state);
    seed = std::get<0>(seeds);
    // The generator hands out offsets in units of 32-bit draws (cuRAND's convention, reserved
    // 4 at a time here); counter word pair (0, 1) holds offset / 4, as cuRAND's Philox does,
    // so this stream never overlaps the ranges other kernels reserve from the same generator.
    ctr = std::get<1>(seeds) / 4;
  }
}

template <typename scalar_t, typename C>
__global__ void sgld_generated_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t n,
                                      StepCoefs<C> c, PhiloxSource src) {
  constexpr bool kDouble = std::is_same<C, double>::value;
  constexpr int64_t kPer = kDouble ? 2 : 4;  // normals per Philox block
  constexpr int64_t kTileElems = kTileBlocks * kPer;
  uint64_t seed, ctr;
  philox_key(src, seed, ctr);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t n_tiles = (n + kTileElems - 1) / kTileElems;
  const int64_t j = threadIdx.x;
  for (int64_t t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    const uint64_t block = static_cast<uint64_t>(t) * kTileBlocks + static_cast<uint64_t>(j);
    uint32_t w0 = static_cast<uint32_t>(ctr), w1 = static_cast<uint32_t>(ctr >> 32);
    uint32_t w2 = static_cast<uint32_t>(block), w3 = static_cast<uint32_t>(block >> 32);
    philox4x32_10(w0, w1, w2, w3, k0, k1);
    C eps[kPer];
    if constexpr (kDouble) {
      box_muller(w0, w1, w2, w3, eps[0], eps[1]);
    } else {
      box_muller(w0, w1, eps[0], eps[1]);
      box_muller(w2, w3, eps[2], eps[3]);
    }
    const int64_t base = t * kTileElems + j;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t i = base + k * kTileBlocks;
      if (i < n) {
        x[i] = static_cast<scalar_t>(
            sgld_update<C>(static_cast<C>(x[i]), static_cast<C>(g[i]), eps[k], c, true));
      }
    }
  }
}

// No generated noise: eps from the noise tensor, or none (eps == nullptr).
template <typename scalar_t, typename C>
__global__ void sgld_plain_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                  const scalar_t* __restrict__ eps, int64_t n, StepCoefs<C> c) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const C e = eps != nullptr ? static_cast<C>(eps[i]) : C(0);
    x[i] = static_cast<scalar_t>(sgld_update<C>(static_cast<C>(x[i]), static_cast<C>(g[i]), e, c, eps != nullptr));
  }
}

int64_t grid_limit() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
}

void sgld_step_cuda(at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise, double step_coef,
                    double noise_coef, at::ArrayRef<double> grad_clamp, at::ArrayRef<double> x_clamp,
                    bool noise_after_clamp, std::optional<at::Generator> generator, at::ArrayRef<int64_t> philox) {
  check_sgld_inputs(x, grad, noise, grad_clamp, x_clamp, philox, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const bool has_noise_tensor = noise.has_value() && noise->defined();
  const bool generate = !has_noise_tensor && noise_coef != 0.0;

  PhiloxSource src{};
  if (generate) {
    if (!philox.empty()) {
      src.explicit_key = true;
      src.seed = static_cast<uint64_t>(philox[0]);
      src.ctr = static_cast<uint64_t>(philox[1]);
    } else {
      auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
          generator, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
      std::lock_guard<std::mutex> lock(gen->mutex_);
      src.explicit_key = false;
      src.state = gen->philox_cuda_state(4);
    }
  }

  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor gc = grad.contiguous();
  const at::Tensor ec = has_noise_tensor ? noise->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "structloss_fast_sgld_step_cuda", [&] {
    using C = typename Compute<scalar_t>::type;
    const StepCoefs<C> c = make_step_coefs<C>(step_coef, noise_coef, grad_clamp.empty() ? nullptr : grad_clamp.data(),
                                              x_clamp.empty() ? nullptr : x_clamp.data(), noise_after_clamp);
    scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    if (generate) {
      constexpr int64_t per = std::is_same<C, double>::value ? 2 : 4;
      const int64_t n_tiles = (n + kTileBlocks * per - 1) / (kTileBlocks * per);
      const int64_t blocks = std::min<int64_t>(n_tiles, grid_limit());
      sgld_generated_kernel<scalar_t, C><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xp, gp, n, c, src);
    } else {
      const scalar_t* ep = has_noise_tensor ? ec.data_ptr<scalar_t>() : nullptr;
      constexpr int threads = 256;
      const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, grid_limit());
      sgld_plain_kernel<scalar_t, C><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(xp, gp, ep, n, c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!x.is_same(xc)) x.copy_(xc);
}

}  // namespace
}  // namespace sgld

TORCH_LIBRARY_IMPL(structloss_fast, CUDA, m) { m.impl("sgld_step_", &sgld::sgld_step_cuda); }

}  // namespace structloss_fast
