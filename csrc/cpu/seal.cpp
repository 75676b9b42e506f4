// CPU kernels of the SEAL family: the fused sample-and-score noise-contrastive loss.
//
// For every example b the kernel draws K Bernoulli(p_b) label vectors from a counter-based
// generator (Philox4x32-10 keyed by a 64-bit seed, counter = (l mod J, sample, example) with
// J = ceil(L / 4), word l div J for label l:
// see csrc/common/seal_math.h and structloss_fast/reference/seal.py), and scores each one,
//   z_k = u_b . y_k + c2^T softplus(C1 y_k + b1) - log q(y_k),
// next to the gold vector at k = 0, and returns loss_b = LSE_k z_k - z_0. Samples are binary,
// so C1 y_k is a sum of columns of C1: the kernel keeps, per sample, the list of the labels where
// it differs from the example's vector f = [p > 1/2] and computes C1 y_k + b1 = (C1 f + b1) +
// (columns added) - (columns removed): the cost is proportional to sum_l min(p_l, 1 - p_l), not
// to L. It never stores the B x K x L sample tensor: a sample lives in per-thread scratch while
// its example is scored. The gradient is formed in the same pass when the loss is reduced
// (compute_grad), or recomputed from the seed in the backward op.
//
// Examples are processed in fixed chunks (independent of the thread count); each chunk owns a
// partial gradient of C1, b1, c2 and the partials are summed in chunk order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/seal_math.h"

namespace structloss_fast {
namespace {

using seal::Philox4;
using seal::philox4x32_10;
using seal::softplus_sigmoid;

constexpr int64_t kHiddenBlock = 16;  // H is padded to a multiple of this (zero columns)

template <typename T>
struct NceProblem {
  int64_t B, K, L, H, Hp;
  const T* unary;    // B x L
  const T* probs;    // B x L
  const T* gold;     // B x L
  const T* w1t;      // L x Hp: C1^T, zero-padded columns
  const T* b1;       // Hp
  const T* c2;       // Hp
  const T* h_gold;   // B x Hp: C1 y*_b + b1
  const T* samples;  // B x K x L, or nullptr: draw from the seed
  uint32_t key0, key1;
  bool use_logq;
};

template <typename T>
struct NceScratch {
  std::vector<T> lp, l1p, p24;   // L: clamped log p, clamped log(1 - p), p * 2^24
  std::vector<uint32_t> words;   // 4 * ceil(L / 4)
  std::vector<int32_t> on;       // K x L: 0 / 1 (32-bit, the width of the float compares)
  // Labels with p > 1/2 are "flipped": a sample is described by its exceptions to the
  // vector f = [p > 1/2] (labels on that are not flipped, then flipped labels that are off),
  // and C1 y_k + b1 = base + sum(C1 columns of the first) - sum(C1 columns of the second),
  // base = C1 f + b1 once per example: on average sum_l min(p_l, 1 - p_l) columns per sample
  // rather than sum_l p_l (half the work for p uniform in [0, 1]).
  std::vector<int32_t> flip;     // L: 0 / 1
  std::vector<int32_t> order;    // L: the labels, not flipped first
  int32_t n_unflipped = 0;
  std::vector<T> base;           // Hp
  std::vector<int32_t> idx;      // K x L: the exceptions of each sample, additions first
  std::vector<int32_t> nnz;      // K: exceptions
  std::vector<int32_t> nplus;    // K: additions among them
  std::vector<int32_t> col;      // L x K: per label, the samples in which it is an exception
  std::vector<int32_t> ncol;     // L
  std::vector<T> gall;           // Hp: sum of dl/dh over the samples
  std::vector<T> hidden;         // K x Hp: C1 y_k + b1
  std::vector<T> sp, gc;         // (K + 1) x Hp: softplus(h) and c2 * sigmoid(h); row 0 = gold
  std::vector<T> z;              // K + 1

  explicit NceScratch(const NceProblem<T>& P)
      : lp(P.L), l1p(P.L), p24(P.L), words(4 * ((P.L + 3) / 4) + 4), on(P.K * P.L), flip(P.L), order(P.L + 1),
        base(P.Hp), idx(P.K * P.L + 1), nnz(P.K), nplus(P.K), col(P.L * P.K + 1), ncol(P.L), gall(P.Hp), hidden(P.K * P.Hp), sp((P.K + 1) * P.Hp), gc((P.K + 1) * P.Hp), z(P.K + 1) {}
};

// out[0:NB] = base[0:NB] (+ base2[0:NB]) +/- sum over m of rows[idx[m]][0:NB], with the NB
// accumulators held in registers as GCC vector-extension values (written out so that the
// compiler cannot interchange the loops into a scalar gather, which it does with plain arrays).
template <int NB, bool SUB, typename T>
SLF_HD void sum_rows_block(T* out, const T* base, const T* base2, const T* __restrict rows, int64_t ld,
                           const int32_t* __restrict idx, int32_t n) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int VL = 32 / sizeof(T);
  constexpr int NV = NB / VL;
  // Two sets of accumulators (even and odd m): twice the independent add chains, so that the
  // loop runs at the load throughput rather than at the latency of one add per row.
  V acc[NV], acc2[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    __builtin_memcpy(&acc[v], base + v * VL, sizeof(V));
    acc2[v] = V{};
    if (base2 != nullptr) {
      V b2;
      __builtin_memcpy(&b2, base2 + v * VL, sizeof(V));
      acc2[v] = b2;
    }
  }
  int32_t m = 0;
  for (; m + 2 <= n; m += 2) {
    const T* __restrict row = rows + static_cast<int64_t>(idx[m]) * ld;
    const T* __restrict row2 = rows + static_cast<int64_t>(idx[m + 1]) * ld;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V r, r2;
      __builtin_memcpy(&r, row + v * VL, sizeof(V));
      __builtin_memcpy(&r2, row2 + v * VL, sizeof(V));
      if (SUB) {
        acc[v] -= r;
        acc2[v] -= r2;
      } else {
        acc[v] += r;
        acc2[v] += r2;
      }
    }
  }
  if (m < n) {
    const T* __restrict row = rows + static_cast<int64_t>(idx[m]) * ld;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V r;
      __builtin_memcpy(&r, row + v * VL, sizeof(V));
      if (SUB) {
        acc[v] -= r;
      } else {
        acc[v] += r;
      }
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    acc[v] += acc2[v];
    __builtin_memcpy(out + v * VL, &acc[v], sizeof(V));
  }
}

// Applies sum_rows_block over all of [0, Hp) (a multiple of kHiddenBlock), in blocks of 32.
template <bool SUB, typename T>
SLF_HD void sum_rows(T* out, const T* base, const T* base2, const T* rows, int64_t Hp, const int32_t* idx, int32_t n) {
  int64_t h = 0;
  for (; h + 32 <= Hp; h += 32) {
    sum_rows_block<32, SUB>(out + h, base + h, base2 == nullptr ? nullptr : base2 + h, rows + h, Hp, idx, n);
  }
  for (; h < Hp; h += kHiddenBlock) {
    sum_rows_block<kHiddenBlock, SUB>(out + h, base + h, base2 == nullptr ? nullptr : base2 + h, rows + h, Hp, idx,
                                      n);
  }
}

// Per-example constants: clamped logs (torch's BCELoss clamps each log at -100) and p * 2^24.
// Returns 0 * sum(p): NaN when a probability is NaN, so that a NaN p gives a NaN loss even in
// the ranking variant (where p only decides the samples).
template <typename T>
SLF_CPU_MULTIVERSION T prepare_example(const NceProblem<T>& P, int64_t b, NceScratch<T>& S) {
  const T* p = P.probs + b * P.L;
  T psum = T(0);
  for (int64_t l = 0; l < P.L; ++l) {
    const T pl = p[l];
    S.lp[l] = std::max(std::log(pl), T(-100));
    S.l1p[l] = std::max(std::log1p(-pl), T(-100));
    S.p24[l] = pl * static_cast<T>(seal::kTwo24);
    S.flip[l] = pl > T(0.5) ? 1 : 0;
    psum += pl;
  }
  int32_t n = 0;
  for (int64_t l = 0; l < P.L; ++l) {  // branch-free compactions: not flipped, then flipped
    S.order[n] = static_cast<int32_t>(l);
    n += 1 - S.flip[l];
  }
  S.n_unflipped = n;
  for (int64_t l = 0; l < P.L; ++l) {
    S.order[n] = static_cast<int32_t>(l);
    n += S.flip[l];
  }
  if (P.w1t == nullptr) return psum * T(0);  // sampling only (seal_bernoulli)
  sum_rows<false>(S.base.data(), P.b1, static_cast<const T*>(nullptr), P.w1t, P.Hp, S.order.data() + S.n_unflipped,
                  static_cast<int32_t>(P.L) - S.n_unflipped);
  return psum * T(0);
}

// Draws sample k of example b (or reads it from P.samples): fills on[k], the list idx[k] of
// the labels that are on, and returns (u . y, log q(y)).
template <typename T>
SLF_CPU_MULTIVERSION void draw_sample(const NceProblem<T>& P, int64_t b, int64_t k, NceScratch<T>& S, T& local,
                                      T& logq) {
  const int64_t L = P.L;
  int32_t* __restrict on = S.on.data() + k * L;
  const T* __restrict u = P.unary + b * L;
  const T* __restrict lp = S.lp.data();
  const T* __restrict l1p = S.l1p.data();
  if (P.samples == nullptr) {
    const int64_t J = (L + 3) / 4;
    uint32_t* __restrict wout = S.words.data();
    const uint32_t bl = static_cast<uint32_t>(static_cast<uint64_t>(b));
    const uint32_t bh = static_cast<uint32_t>(static_cast<uint64_t>(b) >> 32);
    const uint32_t kk = static_cast<uint32_t>(k);
    // Label l takes word (l / J) of call (l % J): four contiguous streams (no interleaving).
    for (int64_t j = 0; j < J; ++j) {
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(j), kk, bl, bh, P.key0, P.key1);
      wout[j] = r.x0;
      wout[J + j] = r.x1;
      wout[2 * J + j] = r.x2;
      wout[3 * J + j] = r.x3;
    }
  }
  const T* __restrict p24 = S.p24.data();
  const uint32_t* __restrict words = S.words.data();
  const T* __restrict y = P.samples == nullptr ? nullptr : P.samples + (b * P.K + k) * L;
  T loc = T(0), lq = T(0);
  if (y == nullptr) {
#pragma omp simd reduction(+ : loc, lq)
    for (int64_t l = 0; l < L; ++l) {
      const bool o = static_cast<T>(static_cast<int32_t>(words[l] >> 8)) < p24[l];
      on[l] = o ? 1 : 0;
      loc += o ? u[l] : T(0);
      lq += o ? lp[l] : l1p[l];
    }
  } else {
#pragma omp simd reduction(+ : loc, lq)
    for (int64_t l = 0; l < L; ++l) {
      const bool o = y[l] != T(0);
      on[l] = o ? 1 : 0;
      loc += o ? u[l] : T(0);
      lq += o ? lp[l] : l1p[l];
    }
  }
  // The exceptions to the flip vector, additions first (branch-free compaction).
  int32_t* __restrict idx = S.idx.data() + k * L;
  const int32_t* __restrict order = S.order.data();
  const int64_t nu = S.n_unflipped;
  int32_t n = 0;
  for (int64_t t = 0; t < nu; ++t) {
    const int32_t l = order[t];
    idx[n] = l;
    n += on[l];
  }
  S.nplus[k] = n;
  for (int64_t t = nu; t < L; ++t) {
    const int32_t l = order[t];
    idx[n] = l;
    n += 1 - on[l];
  }
  S.nnz[k] = n;
  local = loc;
  logq = lq;
}

// c2^T softplus(h); with keep, stores softplus(h) and c2 * sigmoid(h) for the gradient.
template <typename T>
SLF_CPU_MULTIVERSION T global_term(const T* __restrict h, const T* __restrict c2, int64_t Hp, bool keep,
                                   T* __restrict sp_out, T* __restrict gc_out) {
  T acc = T(0);
  if (keep) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < Hp; ++i) {
      T sp, sg;
      softplus_sigmoid(h[i], sp, sg);
      sp_out[i] = sp;
      gc_out[i] = c2[i] * sg;
      acc += c2[i] * sp;
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < Hp; ++i) {
      T sp, sg;
      softplus_sigmoid(h[i], sp, sg);
      acc += c2[i] * sp;
    }
  }
  return acc;
}

// hidden[k] = C1 y_k + b1 = base + (additions) - (removals) for all K samples, H-block by
// H-block so that the block of C1^T (L x 32) stays in L1 while every sample sums its rows.
template <typename T>
SLF_CPU_MULTIVERSION void hidden_of_samples(const NceProblem<T>& P, NceScratch<T>& S) {
  const int64_t Hp = P.Hp, L = P.L;
  const T* nobase = nullptr;
  int64_t h = 0;
  for (; h + 32 <= Hp; h += 32) {
    for (int64_t k = 0; k < P.K; ++k) {
      T* out = S.hidden.data() + k * Hp + h;
      const int32_t* idx = S.idx.data() + k * L;
      sum_rows_block<32, false>(out, S.base.data() + h, nobase, P.w1t + h, Hp, idx, S.nplus[k]);
      sum_rows_block<32, true>(out, out, nobase, P.w1t + h, Hp, idx + S.nplus[k], S.nnz[k] - S.nplus[k]);
    }
  }
  for (; h < Hp; h += kHiddenBlock) {
    for (int64_t k = 0; k < P.K; ++k) {
      T* out = S.hidden.data() + k * Hp + h;
      const int32_t* idx = S.idx.data() + k * L;
      sum_rows_block<kHiddenBlock, false>(out, S.base.data() + h, nobase, P.w1t + h, Hp, idx, S.nplus[k]);
      sum_rows_block<kHiddenBlock, true>(out, out, nobase, P.w1t + h, Hp, idx + S.nplus[k], S.nnz[k] - S.nplus[k]);
    }
  }
}

// Scores the gold vector and the K samples of example b into S.z; returns LSE_k z_k.
// With keep, S.sp / S.gc hold what the gradient needs (row 0 gold, row k + 1 sample k).
template <typename T>
T score_example(const NceProblem<T>& P, int64_t b, NceScratch<T>& S, bool keep) {
  const int64_t L = P.L, Hp = P.Hp;
  const T poison = prepare_example(P, b, S);
  {
    const T* g = P.gold + b * L;
    const T* u = P.unary + b * L;
    T loc = T(0), lq = T(0);
#pragma omp simd reduction(+ : loc, lq)
    for (int64_t l = 0; l < L; ++l) {
      loc += g[l] * u[l];
      lq += g[l] * S.lp[l] + (T(1) - g[l]) * S.l1p[l];
    }
    const T glob = global_term(P.h_gold + b * Hp, P.c2, Hp, keep, S.sp.data(), S.gc.data());
    S.z[0] = loc + glob - (P.use_logq ? lq : T(0)) + poison;
  }
  for (int64_t k = 0; k < P.K; ++k) {
    T loc, lq;
    draw_sample(P, b, k, S, loc, lq);
    S.z[k + 1] = loc - (P.use_logq ? lq : T(0)) + poison;
  }
  hidden_of_samples(P, S);
  for (int64_t k = 0; k < P.K; ++k) {
    S.z[k + 1] += global_term(S.hidden.data() + k * Hp, P.c2, Hp, keep, S.sp.data() + (k + 1) * Hp,
                              S.gc.data() + (k + 1) * Hp);
  }
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k <= P.K; ++k) mx = S.z[k] > mx ? S.z[k] : mx;
  // A non-finite maximum (an inf score, or NaN everywhere): no shift, so that the sum below
  // carries the inf or NaN into the loss.
  if (!std::isfinite(mx)) mx = T(0);
  T sum = T(0);
  for (int64_t k = 0; k <= P.K; ++k) sum += std::exp(S.z[k] - mx);
  return mx + std::log(sum);
}

// Gradient of w_row * loss_b with the scratch of score_example(keep = true):
// dl/dz_k = softmax_k - [k == 0].
template <typename T>
struct GradOut {
  T* grad_unary;  // B x L
  T* g_gold;      // B x Hp: dl/dh of the gold row, for one GEMM with the gold labels afterwards
  T* w1t_part;    // L x Hp partial of this chunk
  T* b1_part;     // Hp
  T* c2_part;     // Hp
};

template <typename T>
SLF_CPU_MULTIVERSION void example_gradient(const NceProblem<T>& P, int64_t b, NceScratch<T>& S, T lse, T w_row,
                                           const GradOut<T>& G) {
  const int64_t L = P.L, Hp = P.Hp, K = P.K;
  std::vector<T>& w = S.z;  // reuse: z_k -> dl/dz_k
  for (int64_t k = 0; k <= K; ++k) w[k] = w_row * std::exp(S.z[k] - lse);
  w[0] -= w_row;
  // unary: du_l = sum_k w_k y_kl
  T* __restrict du = G.grad_unary + b * L;
  const T* __restrict gold = P.gold + b * L;
  {
    const T w0 = w[0];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) du[l] = w0 * gold[l];
  }
  for (int64_t k = 0; k < K; ++k) {
    const T wk = w[k + 1];
    const int32_t* __restrict on = S.on.data() + k * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) du[l] += static_cast<T>(on[l]) * wk;
  }
  // dl/dh_k = w_k c2 sigmoid(h_k) (in place of gc); b1 and c2 partials.
  T* __restrict db1 = G.b1_part;
  T* __restrict dc2 = G.c2_part;
  for (int64_t k = 0; k <= K; ++k) {
    const T wk = w[k];
    T* __restrict gk = S.gc.data() + k * Hp;
    const T* __restrict spk = S.sp.data() + k * Hp;
#pragma omp simd
    for (int64_t i = 0; i < Hp; ++i) {
      const T g = wk * gk[i];
      gk[i] = g;
      db1[i] += g;
      dc2[i] += wk * spk[i];
    }
  }
  std::copy(S.gc.data(), S.gc.data() + Hp, G.g_gold + b * Hp);
  // C1^T rows: dW1t[l] += sum over the samples with label l on of dl/dh_k, that is, for a
  // flipped label, (sum over all samples) - (sum over the samples with l off). Per-label lists
  // of exception samples from the per-sample lists (work proportional to the exceptions), then
  // H-block by H-block so that the block of the partial stays in L1.
  int32_t* __restrict ncol = S.ncol.data();
  int32_t* __restrict col = S.col.data();
  std::fill(ncol, ncol + L, 0);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t* idx = S.idx.data() + k * L;
    for (int32_t m = 0, n = S.nnz[k]; m < n; ++m) {
      const int32_t l = idx[m];
      col[l * K + ncol[l]++] = static_cast<int32_t>(k);
    }
  }
  const T* g_samples = S.gc.data() + Hp;
  const bool any_flipped = S.n_unflipped < L;
  if (any_flipped) {
    T* __restrict gall = S.gall.data();
    std::fill(gall, gall + Hp, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T* __restrict gk = g_samples + k * Hp;
#pragma omp simd
      for (int64_t i = 0; i < Hp; ++i) gall[i] += gk[i];
    }
  }
  const int32_t* flip = S.flip.data();
  const T* nobase = nullptr;
  int64_t h = 0;
  for (; h + 32 <= Hp; h += 32) {
    for (int64_t l = 0; l < L; ++l) {
      T* row = G.w1t_part + l * Hp + h;
      if (flip[l]) {
        sum_rows_block<32, true>(row, row, S.gall.data() + h, g_samples + h, Hp, col + l * K, ncol[l]);
      } else if (ncol[l] != 0) {
        sum_rows_block<32, false>(row, row, nobase, g_samples + h, Hp, col + l * K, ncol[l]);
      }
    }
  }
  for (; h < Hp; h += kHiddenBlock) {
    for (int64_t l = 0; l < L; ++l) {
      T* row = G.w1t_part + l * Hp + h;
      if (flip[l]) {
        sum_rows_block<kHiddenBlock, true>(row, row, S.gall.data() + h, g_samples + h, Hp, col + l * K, ncol[l]);
      } else if (ncol[l] != 0) {
        sum_rows_block<kHiddenBlock, false>(row, row, nobase, g_samples + h, Hp, col + l * K, ncol[l]);
      }
    }
  }
}

// Chunks of examples with their own partial gradients; the size depends on B only.
int64_t chunk_size(int64_t B) { return std::max<int64_t>(8, (B + 31) / 32); }

struct Prepared {
  at::Tensor unary, probs, gold, w1t, b1, c2, h_gold, samples;
  int64_t B, K, L, H, Hp;
  uint32_t key0, key1;
};

void check_inputs(const at::Tensor& unary, const at::Tensor& probs, const at::Tensor& labels, const at::Tensor& W,
                  const at::Tensor& b1, const at::Tensor& c2, const at::Tensor& seed,
                  const c10::optional<at::Tensor>& samples, int64_t num_samples) {
  TORCH_CHECK(unary.dim() == 2, "structloss_fast: unary must be (B, L)");
  const int64_t B = unary.size(0), L = unary.size(1);
  TORCH_CHECK(probs.sizes() == unary.sizes(), "structloss_fast: probs must have unary's shape");
  TORCH_CHECK(labels.sizes() == unary.sizes(), "structloss_fast: labels must have unary's shape");
  TORCH_CHECK(W.dim() == 2 && W.size(1) == L, "structloss_fast: global_weight must be (H, L)");
  const int64_t H = W.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == H, "structloss_fast: global_bias must be (H,)");
  TORCH_CHECK(c2.dim() == 1 && c2.size(0) == H, "structloss_fast: global_out must be (H,)");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "structloss_fast: seed must hold one int64");
  TORCH_CHECK(num_samples >= 1, "structloss_fast: num_samples must be >= 1");
  const auto dt = unary.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "structloss_fast: the SEAL kernels take float32 or float64 (low precision is upcast by the caller)");
  for (const at::Tensor* t : {&probs, &labels, &W, &b1, &c2}) {
    TORCH_CHECK(t->scalar_type() == dt, "structloss_fast: all floating inputs must share unary's dtype");
    TORCH_CHECK(t->device() == unary.device(), "structloss_fast: all inputs must be on one device");
  }
  if (samples.has_value()) {
    TORCH_CHECK(samples->dim() == 3 && samples->size(0) == B && samples->size(1) == num_samples &&
                    samples->size(2) == L,
                "structloss_fast: samples must be (B, num_samples, L)");
    TORCH_CHECK(samples->scalar_type() == dt, "structloss_fast: samples must share unary's dtype");
  }
}

Prepared prepare(const at::Tensor& unary, const at::Tensor& probs, const at::Tensor& labels, const at::Tensor& W,
                 const at::Tensor& b1, const at::Tensor& c2, const at::Tensor& seed,
                 const c10::optional<at::Tensor>& samples, int64_t num_samples) {
  check_inputs(unary, probs, labels, W, b1, c2, seed, samples, num_samples);
  Prepared r;
  r.B = unary.size(0);
  r.L = unary.size(1);
  r.H = W.size(0);
  r.K = num_samples;
  r.Hp = std::max<int64_t>(kHiddenBlock, (r.H + kHiddenBlock - 1) / kHiddenBlock * kHiddenBlock);
  r.unary = unary.contiguous();
  r.probs = probs.contiguous();
  r.gold = labels.contiguous();
  const auto opts = unary.options();
  r.w1t = at::zeros({r.L, r.Hp}, opts);
  r.w1t.narrow(1, 0, r.H).copy_(W.t());
  r.b1 = at::zeros({r.Hp}, opts);
  r.b1.narrow(0, 0, r.H).copy_(b1);
  r.c2 = at::zeros({r.Hp}, opts);
  r.c2.narrow(0, 0, r.H).copy_(c2);
  r.h_gold = at::addmm(r.b1, r.gold, r.w1t);  // B x Hp
  if (samples.has_value()) r.samples = samples->contiguous();
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kCPU).contiguous().data_ptr<int64_t>()[0]);
  r.key0 = static_cast<uint32_t>(s);
  r.key1 = static_cast<uint32_t>(s >> 32);
  return r;
}

template <typename T>
NceProblem<T> problem_of(const Prepared& r, bool use_logq) {
  return NceProblem<T>{r.B, r.K, r.L, r.H, r.Hp, r.unary.data_ptr<T>(), r.probs.data_ptr<T>(), r.gold.data_ptr<T>(),
                       r.w1t.data_ptr<T>(), r.b1.data_ptr<T>(), r.c2.data_ptr<T>(), r.h_gold.data_ptr<T>(),
                       r.samples.defined() ? r.samples.data_ptr<T>() : nullptr, r.key0, r.key1, use_logq};
}

// Runs the examples chunk by chunk; with grad (row weights given by weight_of), returns
// (grad_unary, grad_weight, grad_bias, grad_out).
template <typename T, typename WeightOf>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_examples(const Prepared& r, const NceProblem<T>& P,
                                                                        at::Tensor& stats, bool want_grad,
                                                                        const WeightOf& weight_of) {
  const int64_t B = P.B, L = P.L, Hp = P.Hp, K = P.K;
  const auto opts = r.unary.options();
  const int64_t CH = chunk_size(B);
  const int64_t n_chunks = (B + CH - 1) / CH;
  at::Tensor grad_unary, g_gold, w1t_part, b1_part, c2_part;
  if (want_grad) {
    grad_unary = at::empty({B, L}, opts);
    g_gold = at::empty({B, Hp}, opts);
    w1t_part = at::zeros({n_chunks, L, Hp}, opts);
    b1_part = at::zeros({n_chunks, Hp}, opts);
    c2_part = at::zeros({n_chunks, Hp}, opts);
  }
  T* st = stats.data_ptr<T>();
  const int64_t n_stats = K + 2;
  // Small problems run inline: a parallel region costs more than their work (and under load a
  // second thread may not even be scheduled).
  const int64_t work_per_chunk = std::max<int64_t>(1, CH * (K + 1) * (L + Hp));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work_per_chunk);
  at::parallel_for(0, n_chunks, grain, [&](int64_t c_begin, int64_t c_end) {
    NceScratch<T> S(P);
    for (int64_t c = c_begin; c < c_end; ++c) {
      GradOut<T> G{};
      if (want_grad) {
        G = GradOut<T>{grad_unary.data_ptr<T>(), g_gold.data_ptr<T>(), w1t_part.data_ptr<T>() + c * L * Hp,
                       b1_part.data_ptr<T>() + c * Hp, c2_part.data_ptr<T>() + c * Hp};
      }
      for (int64_t b = c * CH; b < std::min(B, (c + 1) * CH); ++b) {
        const T lse = score_example(P, b, S, want_grad);
        T* row = st + b * n_stats;
        for (int64_t k = 0; k <= K; ++k) row[k] = S.z[k];
        row[K + 1] = lse;
        if (want_grad) example_gradient(P, b, S, lse, weight_of(b), G);
      }
    }
  });
  if (!want_grad) return {};
  const int64_t H = P.H;
  at::Tensor w1t_grad = w1t_part.sum(0);  // chunk order: deterministic
  at::Tensor grad_weight = at::addmm(w1t_grad.narrow(1, 0, H).t(), g_gold.narrow(1, 0, H).t(), r.gold).contiguous();
  at::Tensor grad_bias = b1_part.sum(0).narrow(0, 0, H).contiguous();
  at::Tensor grad_out = c2_part.sum(0).narrow(0, 0, H).contiguous();
  return {grad_unary, grad_weight, grad_bias, grad_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> seal_nce_loss_cpu(
    const at::Tensor& unary, const at::Tensor& probs, const at::Tensor& labels, const at::Tensor& global_weight,
    const at::Tensor& global_bias, const at::Tensor& global_out, const at::Tensor& seed,
    const c10::optional<at::Tensor>& samples, int64_t num_samples, bool use_logq, bool compute_grad) {
  const Prepared r = prepare(unary, probs, labels, global_weight, global_bias, global_out, seed, samples, num_samples);
  const auto opts = r.unary.options();
  at::Tensor stats = at::empty({r.B, r.K + 2}, opts);
  at::Tensor gu, gw, gb, gc;
  AT_DISPATCH_FLOATING_TYPES(r.unary.scalar_type(), "structloss_fast_seal_nce_cpu", [&] {
    const NceProblem<scalar_t> P = problem_of<scalar_t>(r, use_logq);
    // The gradients of the unit-weight sum over examples; the Python glue scales them.
    std::tie(gu, gw, gb, gc) = run_examples<scalar_t>(r, P, stats, compute_grad, [](int64_t) { return scalar_t(1); });
  });
  if (!compute_grad) {
    gu = at::empty({0, r.L}, opts);
    gw = at::empty({0, r.L}, opts);
    gb = at::empty({0}, opts);
    gc = at::empty({0}, opts);
  }
  return {stats, gu, gw, gb, gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> seal_nce_loss_backward_cpu(
    const at::Tensor& unary, const at::Tensor& probs, const at::Tensor& labels, const at::Tensor& global_weight,
    const at::Tensor& global_bias, const at::Tensor& global_out, const at::Tensor& seed,
    const c10::optional<at::Tensor>& samples, int64_t num_samples, bool use_logq, const at::Tensor& stats,
    const at::Tensor& row_weights) {
  const Prepared r = prepare(unary, probs, labels, global_weight, global_bias, global_out, seed, samples, num_samples);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == r.B && stats.size(1) == r.K + 2,
              "structloss_fast: stats must be (B, num_samples + 2)");
  TORCH_CHECK(row_weights.dim() == 1 && row_weights.size(0) == r.B, "structloss_fast: row_weights must be (B,)");
  at::Tensor fresh = at::empty({r.B, r.K + 2}, r.unary.options());
  const at::Tensor weights = row_weights.to(r.unary.scalar_type()).contiguous();
  at::Tensor gu, gw, gb, gc;
  AT_DISPATCH_FLOATING_TYPES(r.unary.scalar_type(), "structloss_fast_seal_nce_backward_cpu", [&] {
    const NceProblem<scalar_t> P = problem_of<scalar_t>(r, use_logq);
    const scalar_t* wp = weights.data_ptr<scalar_t>();
    // The scores are recomputed bit for bit; the saved stats are not needed beyond the shape check.
    std::tie(gu, gw, gb, gc) = run_examples<scalar_t>(r, P, fresh, true, [wp](int64_t b) { return wp[b]; });
  });
  return {gu, gw, gb, gc};
}

at::Tensor seal_bernoulli_cpu(const at::Tensor& probs, const at::Tensor& seed, int64_t num_samples) {
  TORCH_CHECK(probs.dim() == 2, "structloss_fast: probs must be (B, L)");
  TORCH_CHECK(num_samples >= 1, "structloss_fast: num_samples must be >= 1");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "structloss_fast: seed must hold one int64");
  TORCH_CHECK(probs.scalar_type() == at::kFloat || probs.scalar_type() == at::kDouble,
              "structloss_fast: seal_bernoulli takes float32 or float64 probs");
  const at::Tensor p = probs.contiguous();
  const int64_t B = p.size(0), L = p.size(1), K = num_samples;
  at::Tensor out = at::empty({B, K, L}, p.options());
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kCPU).contiguous().data_ptr<int64_t>()[0]);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "structloss_fast_seal_bernoulli_cpu", [&] {
    using T = scalar_t;
    // A problem with the fields the sampler reads; u = 0 and H = 0.
    at::Tensor zeros = at::zeros({B, L}, p.options());
    NceProblem<T> P{B, K, L, 0, kHiddenBlock, zeros.data_ptr<T>(), p.data_ptr<T>(), nullptr, nullptr,
                    nullptr, nullptr, nullptr, nullptr, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), true};
    T* o = out.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      NceScratch<T> S(P);
      for (int64_t b = b0; b < b1; ++b) {
        prepare_example(P, b, S);
        for (int64_t k = 0; k < K; ++k) {
          T loc, lq;
          draw_sample(P, b, k, S, loc, lq);
          for (int64_t l = 0; l < L; ++l) o[(b * K + k) * L + l] = static_cast<T>(S.on[k * L + l]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("seal_nce_loss", &seal_nce_loss_cpu);
  m.impl("seal_nce_loss_backward", &seal_nce_loss_backward_cpu);
  m.impl("seal_bernoulli", &seal_bernoulli_cpu);
}

}  // namespace structloss_fast
