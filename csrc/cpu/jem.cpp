// CPU kernel of the fused SGLD step (structloss_fast::sgld_step_): one pass over x, reading x
// and grad (and the noise tensor when one is given), writing x; the Gaussian noise is
// generated in the kernel, tile by tile into 2 KiB buffers that stay in L1, from counter-based
// Philox keyed by one 64-bit draw of the CPU generator. The noise of element i depends only on
// (seed, i), so the result does not depend on the thread count (at::parallel_for over tiles).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "../common/jem_common.h"

// Contraction of a*b+c into an FMA would change the rounding of the update (and of the noise
// polynomials between the AVX2 and the baseline clone): off for everything defined below, so
// that results match the PyTorch reference to the bit and are the same on every x86-64 CPU.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#include "../common/jem_math.h"

namespace structloss_fast {
namespace sgld {
namespace {

constexpr int64_t kFloatTile = kTileBlocks * 4;   // elements per tile, float noise
constexpr int64_t kDoubleTile = kTileBlocks * 2;  // elements per tile, double noise
constexpr int64_t kGrainElems = 32768;            // elements per parallel task (at least)

struct PhiloxArgs {
  uint32_t k0, k1;          // key (seed)
  uint32_t ctr_lo, ctr_hi;  // counter base of this call
};

// Philox words of one tile: w[k * W + j] = output word k of block (tile * W + j).
SLF_CPU_MULTIVERSION void philox_tile_portable(uint32_t* __restrict w, int64_t tile, PhiloxArgs p) {
  const uint64_t block0 = static_cast<uint64_t>(tile) * kTileBlocks;
  for (int64_t j = 0; j < kTileBlocks; ++j) {
    const uint64_t block = block0 + static_cast<uint64_t>(j);
    uint32_t c0 = p.ctr_lo, c1 = p.ctr_hi, c2 = static_cast<uint32_t>(block), c3 = static_cast<uint32_t>(block >> 32);
    philox4x32_10(c0, c1, c2, c3, p.k0, p.k1);
    w[j] = c0;
    w[kTileBlocks + j] = c1;
    w[2 * kTileBlocks + j] = c2;
    w[3 * kTileBlocks + j] = c3;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLF_SGLD_AVX2 1
// The same words with AVX2 intrinsics, 8 blocks per vector: the auto-vectorizer handles the
// 32 x 32 -> 64-bit products of the portable loop with many shuffles (about 3x slower).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void philox_tile_avx2(uint32_t* __restrict w, int64_t tile, PhiloxArgs p) {
  const uint64_t block0 = static_cast<uint64_t>(tile) * kTileBlocks;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  static_assert(kTileBlocks % 8 == 0, "a tile is a whole number of 8-block vectors");
  for (int64_t j = 0; j < kTileBlocks; j += 8) {
    // block0 + j is a multiple of 8: adding the lane index never carries into the high word.
    const uint64_t b = block0 + static_cast<uint64_t>(j);
    __m256i c0 = _mm256_set1_epi32(static_cast<int>(p.ctr_lo));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(p.ctr_hi));
    __m256i c2 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b))), lane);
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b >> 32)));
    uint32_t k0 = p.k0, k1 = p.k1;
    for (int r = 0; r < 10; ++r) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo8(c0, m0, lo0, hi0);
      mulhilo8(c2, m1, lo1, hi1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + kTileBlocks + j), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 2 * kTileBlocks + j), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 3 * kTileBlocks + j), c3);
  }
}
#endif

using PhiloxTileFn = void (*)(uint32_t*, int64_t, PhiloxArgs);

// STRUCTLOSS_FAST_SGLD_PORTABLE=1 forces the portable loop (tests compare the two paths).
PhiloxTileFn pick_philox_tile() {
  const char* force = std::getenv("STRUCTLOSS_FAST_SGLD_PORTABLE");
  if (force != nullptr && force[0] == '1') return &philox_tile_portable;
#ifdef SLF_SGLD_AVX2
  if (__builtin_cpu_supports("avx2")) return &philox_tile_avx2;
#endif
  return &philox_tile_portable;
}

// Normals of one float tile, in the layout of the words: buf[k * W + j].
SLF_CPU_MULTIVERSION void normals_tile_float(float* __restrict buf, const uint32_t* __restrict w) {
  for (int64_t j = 0; j < kTileBlocks; ++j) {
    box_muller(w[j], w[kTileBlocks + j], buf[j], buf[kTileBlocks + j]);
    box_muller(w[2 * kTileBlocks + j], w[3 * kTileBlocks + j], buf[2 * kTileBlocks + j], buf[3 * kTileBlocks + j]);
  }
}

// Double: words (0, 1) make the radius, (2, 3) the angle; two normals per block.
void normals_tile_double(double* __restrict buf, const uint32_t* __restrict w) {
  for (int64_t j = 0; j < kTileBlocks; ++j) {
    box_muller(w[j], w[kTileBlocks + j], w[2 * kTileBlocks + j], w[3 * kTileBlocks + j], buf[j], buf[kTileBlocks + j]);
  }
}

// Elements [b, e) without generated noise: eps from the noise tensor, or none.
template <typename scalar_t>
SLF_CPU_MULTIVERSION void update_range(scalar_t* __restrict x, const scalar_t* __restrict g,
                                       const scalar_t* __restrict eps, int64_t b, int64_t e,
                                       const StepCoefs<typename Compute<scalar_t>::type>& c) {
  using C = typename Compute<scalar_t>::type;
  if (eps != nullptr) {
    for (int64_t i = b; i < e; ++i) {
      x[i] = static_cast<scalar_t>(sgld_update<C>(static_cast<C>(x[i]), static_cast<C>(g[i]), static_cast<C>(eps[i]), c, true));
    }
  } else {
    for (int64_t i = b; i < e; ++i) {
      x[i] = static_cast<scalar_t>(sgld_update<C>(static_cast<C>(x[i]), static_cast<C>(g[i]), C(0), c, false));
    }
  }
}

// Tiles [t0, t1) with noise generated in the kernel.
template <typename scalar_t>
SLF_CPU_MULTIVERSION void update_tiles_generated(scalar_t* __restrict x, const scalar_t* __restrict g, int64_t n,
                                                 int64_t t0, int64_t t1, const StepCoefs<typename Compute<scalar_t>::type>& c,
                                                 PhiloxArgs p) {
  using C = typename Compute<scalar_t>::type;
  constexpr bool kDouble = std::is_same<C, double>::value;
  constexpr int64_t tile_elems = kDouble ? kDoubleTile : kFloatTile;
  static const PhiloxTileFn philox_tile = pick_philox_tile();
  alignas(64) uint32_t words[4 * kTileBlocks];
  alignas(64) C buf[tile_elems];
  for (int64_t t = t0; t < t1; ++t) {
    philox_tile(words, t, p);
    if constexpr (kDouble) {
      normals_tile_double(buf, words);
    } else {
      normals_tile_float(buf, words);
    }
    const int64_t base = t * tile_elems;
    const int64_t len = std::min<int64_t>(tile_elems, n - base);
    scalar_t* __restrict xt = x + base;
    const scalar_t* __restrict gt = g + base;
    for (int64_t i = 0; i < len; ++i) {
      xt[i] = static_cast<scalar_t>(sgld_update<C>(static_cast<C>(xt[i]), static_cast<C>(gt[i]), buf[i], c, true));
    }
  }
}

void sgld_step_cpu(at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise, double step_coef,
                   double noise_coef, at::ArrayRef<double> grad_clamp, at::ArrayRef<double> x_clamp,
                   bool noise_after_clamp, std::optional<at::Generator> generator, at::ArrayRef<int64_t> philox) {
  check_sgld_inputs(x, grad, noise, grad_clamp, x_clamp, philox, at::kCPU);
  const int64_t n = x.numel();
  if (n == 0) return;
  const bool has_noise_tensor = noise.has_value() && noise->defined();
  const bool generate = !has_noise_tensor && noise_coef != 0.0;

  PhiloxArgs p{0, 0, 0, 0};
  if (generate) {
    uint64_t seed, ctr;
    if (!philox.empty()) {
      seed = static_cast<uint64_t>(philox[0]);
      ctr = static_cast<uint64_t>(philox[1]);
    } else {
      auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
      std::lock_guard<std::mutex> lock(gen->mutex_);
      seed = gen->random64();
      ctr = 0;
    }
    p = PhiloxArgs{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(ctr),
                   static_cast<uint32_t>(ctr >> 32)};
  }

  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const at::Tensor gc = grad.contiguous();
  const at::Tensor ec = has_noise_tensor ? noise->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "structloss_fast_sgld_step_cpu", [&] {
    using C = typename Compute<scalar_t>::type;
    const StepCoefs<C> c = make_step_coefs<C>(step_coef, noise_coef, grad_clamp.empty() ? nullptr : grad_clamp.data(),
                                              x_clamp.empty() ? nullptr : x_clamp.data(), noise_after_clamp);
    scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    if (generate) {
      constexpr int64_t tile_elems = std::is_same<C, double>::value ? kDoubleTile : kFloatTile;
      const int64_t n_tiles = (n + tile_elems - 1) / tile_elems;
      at::parallel_for(0, n_tiles, std::max<int64_t>(1, kGrainElems / tile_elems), [&](int64_t t0, int64_t t1) {
        update_tiles_generated<scalar_t>(xp, gp, n, t0, t1, c, p);
      });
    } else {
      const scalar_t* ep = has_noise_tensor ? ec.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, kGrainElems, [&](int64_t b, int64_t e) { update_range<scalar_t>(xp, gp, ep, b, e, c); });
    }
  });
  if (!x.is_same(xc)) x.copy_(xc);
}

}  // namespace
}  // namespace sgld

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) { m.impl("sgld_step_", &sgld::sgld_step_cpu); }

}  // namespace structloss_fast

#pragma GCC pop_options
