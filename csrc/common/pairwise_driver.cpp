#include "pairwise_driver.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "pairwise_math.h"

namespace structloss_fast {

bool aten_epilogue_forced() {
  const char* v = std::getenv("STRUCTLOSS_FAST_PAIRWISE_EPILOGUE");
  if (v == nullptr || *v == '\0' || std::string(v) == "kernel") return false;
  TORCH_CHECK(std::string(v) == "aten", "structloss_fast: STRUCTLOSS_FAST_PAIRWISE_EPILOGUE must be 'aten' or 'kernel', got '",
              v, "'");
  return true;
}

PairwiseSpec make_pairwise_spec(int64_t loss, at::ArrayRef<double> params, int64_t self_offset, bool ref_is_x) {
  TORCH_CHECK(loss >= 0 && loss < kNumPairLosses, "structloss_fast: unknown pairwise loss id ", loss);
  const int64_t n = pair_loss_params(loss), given = static_cast<int64_t>(params.size());
  TORCH_CHECK(given == n || given == n + kNumPairExtParams, "structloss_fast: pairwise loss ", loss, " takes ", n,
              " parameters (", n + kNumPairExtParams, " with the PairExtParam block), got ", given);
  TORCH_CHECK(self_offset >= -1, "structloss_fast: self_offset must be -1 or a reference index, got ", self_offset);
  PairwiseSpec spec{loss, {0.0, 0.0, 0.0}, self_offset, ref_is_x};
  std::copy(params.begin(), params.begin() + n, spec.p);
  if (given > n) {
    const double* ext = params.data() + n;
    spec.value = static_cast<int64_t>(ext[kExtValue]);
    spec.power = ext[kExtPower];
    spec.raw_norms = ext[kExtRawNorms] != 0.0;
    spec.miner = static_cast<int64_t>(ext[kExtMiner]);
    for (int64_t k = 0; k < 3; ++k) spec.mp[k] = ext[kExtMiner0 + k];
    TORCH_CHECK(spec.value >= 0 && spec.value < kNumPairValues, "structloss_fast: unknown pair value ", spec.value);
    TORCH_CHECK(spec.miner >= 0 && spec.miner < kNumPairMiners, "structloss_fast: unknown fused miner ", spec.miner);
    TORCH_CHECK(spec.power > 0.0, "structloss_fast: the distance's power must be > 0, got ", spec.power);
    TORCH_CHECK(pair_miner_fuses(loss, spec.miner), "structloss_fast: pairwise loss ", loss,
                " does not fuse miner ", spec.miner);
  }
  return spec;
}

void check_pairwise_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                           const at::Tensor& ref_labels, const PairwiseSpec& spec) {
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2, "structloss_fast: x and ref must be 2-D");
  TORCH_CHECK(x.size(1) == ref.size(1), "structloss_fast: x and ref differ in embedding size");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "structloss_fast: x and ref differ in dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "structloss_fast: pairwise kernels take float32 or float64 (low precision is upcast by the caller)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "structloss_fast: labels must be (B,)");
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0), "structloss_fast: ref_labels must be (M,)");
  TORCH_CHECK(labels.scalar_type() == ref_labels.scalar_type(), "structloss_fast: labels and ref_labels differ in dtype");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "structloss_fast: labels must be int64 or int32");
  TORCH_CHECK(!spec.ref_is_x || x.size(0) == ref.size(0), "structloss_fast: ref_is_x needs ref of x's length");
  for (const at::Tensor* t : {&labels, &ref, &ref_labels}) {
    TORCH_CHECK(t->device() == x.device(), "structloss_fast: all inputs must be on one device");
  }
}

namespace {

// STRUCTLOSS_FAST_PAIRWISE_STRIP_ROWS: rows per strip (the tests cut small batches into many
// strips); unset: as many as strip_elems allows.
int64_t strip_rows(int64_t B, int64_t M, int64_t strip_elems) {
  if (const char* v = std::getenv("STRUCTLOSS_FAST_PAIRWISE_STRIP_ROWS"); v != nullptr && *v != '\0') {
    return std::min<int64_t>(std::max<int64_t>(1, std::atoll(v)), std::max<int64_t>(B, 1));
  }
  int64_t t = std::max<int64_t>(1, strip_elems / std::max<int64_t>(M, 1));
  if (t >= 16) t -= t % 16;  // whole register tiles for the GEMMs
  return std::min(t, B);
}

// A strip whose gradient has at most one non-zero in kSparseRatio entries is accumulated from
// its non-zeros instead of by two GEMMs (CPU only). Batch-hard triplets have two non-zeros per
// row, contrastive losses their positives and the few negatives inside the margin, mined
// losses their mined pairs: there the GEMMs would multiply zeros. The ratio is the speed of a
// GEMM over that of the row updates (about 30x on AVX2), halved for safety.
constexpr int64_t kSparseRatio = 64;

// STRUCTLOSS_FAST_PAIRWISE_SPARSE: unset = by density, "0" = never, "1" = always (the tests
// run both accumulations on every loss). Read per call: getenv is cheap next to a strip.
int sparse_override() {
  const char* v = std::getenv("STRUCTLOSS_FAST_PAIRWISE_SPARSE");
  if (v == nullptr || *v == '\0') return -1;
  return *v == '0' ? 0 : 1;
}

// Where the gradient goes: rows[k] += G_k @ ref and to[k] += G_k^T @ x_rows (to[k] may be null).
// With split (two-term losses), G_0 = min(G, 0) and G_1 = max(G, 0) (NaN in both); otherwise
// only k = 0, G_0 = G.
struct GradTargets {
  at::Tensor rows[2];
  at::Tensor* to[2];
  bool split;
};

constexpr int64_t kSkip = 32;

template <typename scalar_t>
inline bool all_zero(const scalar_t* p) {
  bool any = false;
#pragma omp simd reduction(| : any)
  for (int64_t j = 0; j < kSkip; ++j) any |= p[j] != scalar_t(0);  // NaN != 0: not skipped
  return !any;
}

// Accumulates the gradient from the non-zeros of G (t x M, contiguous); false, with nothing
// done, when G is too dense. Deterministic: every output row is summed by one thread in a fixed
// order.
template <typename scalar_t>
bool accumulate_sparse(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, GradTargets& out_to) {
  const int forced = sparse_override();
  if (forced == 0) return false;
  const int64_t t = G.size(0), M = G.size(1), D = ref.size(1);
  const scalar_t* g = G.data_ptr<scalar_t>();
  std::vector<int64_t> row_nnz(t + 1, 0);
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* gi = g + i * M;
      int64_t n = 0;
      for (int64_t j = 0; j < M; ++j) n += gi[j] != scalar_t(0);  // NaN counts: it must propagate
      row_nnz[i + 1] = n;
    }
  });
  for (int64_t i = 0; i < t; ++i) row_nnz[i + 1] += row_nnz[i];
  const int64_t nnz = row_nnz[t];
  if (forced < 0 && nnz * kSparseRatio > t * M) return false;

  std::vector<int64_t> cols(nnz);
  std::vector<scalar_t> vals(nnz);
  const bool split = out_to.split;
  // Term 0 takes v < 0, term 1 v > 0, both take NaN (split); without split term 0 takes all.
  auto takes = [split](int k, scalar_t v) { return !split || (k == 0 ? !(v > scalar_t(0)) : !(v < scalar_t(0))); };
  const int n_out = split ? 2 : 1;
  const scalar_t* rf = ref.data_ptr<scalar_t>();
  const scalar_t* xr = x_rows.data_ptr<scalar_t>();
  scalar_t* row_out[2] = {nullptr, nullptr};
  int64_t row_stride[2] = {0, 0};
  for (int o = 0; o < n_out; ++o) {
    row_out[o] = out_to.rows[o].data_ptr<scalar_t>();
    row_stride[o] = out_to.rows[o].stride(0);
  }
  at::parallel_for(0, t, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* gi = g + i * M;
      int64_t k = row_nnz[i];
      if (row_nnz[i + 1] == k) continue;
      for (int64_t j = 0; j < M; ++j) {
        // Skip blocks of zeros with one vectorizable test per block.
        if ((j & (kSkip - 1)) == 0 && j + kSkip <= M && all_zero(gi + j)) {
          j += kSkip - 1;
          continue;
        }
        const scalar_t v = gi[j];
        if (v == scalar_t(0)) continue;
        cols[k] = j;
        vals[k] = v;
        ++k;
        const scalar_t* rj = rf + j * D;
        for (int o = 0; o < n_out; ++o) {
          if (!takes(o, v)) continue;
          scalar_t* out = row_out[o] + i * row_stride[o];
          for (int64_t d = 0; d < D; ++d) out[d] += v * rj[d];
        }
      }
    }
  });
  if (out_to.to[0] == nullptr) return true;

  // Transpose to columns (counting sort keeps the row order inside each column).
  std::vector<int64_t> col_ptr(M + 1, 0);
  for (int64_t k = 0; k < nnz; ++k) ++col_ptr[cols[k] + 1];
  std::vector<int64_t> active;
  for (int64_t j = 0; j < M; ++j) {
    if (col_ptr[j + 1] > 0) active.push_back(j);
    col_ptr[j + 1] += col_ptr[j];
  }
  std::vector<int64_t> fill(col_ptr.begin(), col_ptr.end() - 1), rows_of(nnz);
  std::vector<scalar_t> vals_t(nnz);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t k = row_nnz[i]; k < row_nnz[i + 1]; ++k) {
      const int64_t p = fill[cols[k]]++;
      rows_of[p] = i;
      vals_t[p] = vals[k];
    }
  }
  scalar_t* to_out[2] = {nullptr, nullptr};
  int64_t to_stride[2] = {0, 0};
  for (int o = 0; o < n_out; ++o) {
    to_out[o] = out_to.to[o]->data_ptr<scalar_t>();
    to_stride[o] = out_to.to[o]->stride(0);
  }
  at::parallel_for(0, static_cast<int64_t>(active.size()), 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t j = active[a];
      for (int64_t p = col_ptr[j]; p < col_ptr[j + 1]; ++p) {
        const scalar_t v = vals_t[p];
        const scalar_t* xi = xr + rows_of[p] * D;
        for (int o = 0; o < n_out; ++o) {
          if (!takes(o, v)) continue;
          scalar_t* out = to_out[o] + j * to_stride[o];
          for (int64_t d = 0; d < D; ++d) out[d] += v * xi[d];
        }
      }
    }
  });
  return true;
}

bool try_sparse(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, GradTargets& targets) {
  if (!(G.is_cpu() && G.is_contiguous() && x_rows.is_contiguous() && ref.is_contiguous())) return false;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pairwise_sparse_grad",
                             [&] { done = accumulate_sparse<scalar_t>(G, x_rows, ref, targets); });
  return done;
}

// grad_x[rows] += G @ ref; grad_ref += G^T @ x[rows] (into grad_x when ref is x; skipped
// when grad_ref is not wanted).
void accumulate_dense(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, int64_t row0,
                      at::Tensor& grad_x, at::Tensor& grad_ref, bool ref_is_x) {
  grad_x.narrow(0, row0, G.size(0)).addmm_(G, ref);
  if (ref_is_x) {
    grad_x.addmm_(G.t(), x_rows);
  } else if (grad_ref.size(0) > 0) {
    grad_ref.addmm_(G.t(), x_rows);
  }
}

// (grad_x, grad_ref) pairs are contiguous (allocated by the drivers).
at::Tensor* ref_target(at::Tensor& grad_x, at::Tensor& grad_ref, bool ref_is_x) {
  return ref_is_x ? &grad_x : (grad_ref.size(0) > 0 ? &grad_ref : nullptr);
}

void accumulate_strip_grad(const at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, int64_t row0,
                           at::Tensor& grad_x, at::Tensor& grad_ref, bool ref_is_x) {
  GradTargets targets{{grad_x.narrow(0, row0, G.size(0)), at::Tensor()},
                      {ref_target(grad_x, grad_ref, ref_is_x), nullptr}, false};
  if (try_sparse(G, x_rows, ref, targets)) return;
  accumulate_dense(G, x_rows, ref, row0, grad_x, grad_ref, ref_is_x);
}

// Two-term losses (contrastive): term 0's gradient entries are <= 0 and term 1's >= 0 (d/ds of
// relu(d - m_p) and of relu(m_n - d), d = sqrt(2 - 2s)), so the signs split one strip into the
// two terms, which the reduction scales differently.
void accumulate_strip_grad_split(at::Tensor& G, const at::Tensor& x_rows, const at::Tensor& ref, int64_t row0,
                                 at::Tensor (&grad_x)[2], at::Tensor (&grad_ref)[2], bool ref_is_x) {
  const int64_t t = G.size(0);
  GradTargets targets{{grad_x[0].narrow(0, row0, t), grad_x[1].narrow(0, row0, t)},
                      {ref_target(grad_x[0], grad_ref[0], ref_is_x), ref_target(grad_x[1], grad_ref[1], ref_is_x)},
                      true};
  if (try_sparse(G, x_rows, ref, targets)) return;
  const at::Tensor G0 = G.clamp_max(0);
  G.clamp_min_(0);
  accumulate_dense(G0, x_rows, ref, row0, grad_x[0], grad_ref[0], ref_is_x);
  accumulate_dense(G, x_rows, ref, row0, grad_x[1], grad_ref[1], ref_is_x);
}

struct Prepared {
  at::Tensor x, ref;
  PairwiseRows rows;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
                 const PairwiseSpec& spec) {
  Prepared p;
  p.x = x.contiguous();
  p.ref = spec.ref_is_x ? p.x : ref.contiguous();
  p.rows.labels = labels.contiguous();
  p.rows.ref_labels = spec.ref_is_x ? p.rows.labels : ref_labels.contiguous();
  p.rows.x_sq = p.x.square().sum(1);
  p.rows.ref_sq = spec.ref_is_x ? p.rows.x_sq : p.ref.square().sum(1);
  return p;
}

// Turns the GEMM strip g into the values the epilogue reads (PairValue) and returns dv/dg
// where it is not constant (undefined otherwise). The distance is formed in place:
// d = sqrt(max(n_i + n_j - 2 g, 0)); d(d^q)/dg = -q d^(q-2), 0 at d = 0 (torch.cdist's
// convention, as the inline distance's).
at::Tensor to_values(at::Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec) {
  if (spec.value == kValueGemm) return at::Tensor();
  if (spec.value == kValueNegGemm) {
    S.neg_();
    return at::Tensor();
  }
  S.mul_(-2).add_(rows.x_sq.narrow(0, row0, S.size(0)).unsqueeze(1)).add_(rows.ref_sq.unsqueeze(0));
  S.clamp_min_(0).sqrt_();
  const double q = spec.power;
  at::Tensor chain = q == 1.0 ? S.reciprocal() : S.pow(q - 2.0);
  chain.mul_(spec.value == kValueNegDistPow ? q : -q).masked_fill_(S.eq(0), 0);
  if (q != 1.0) S.pow_(q);
  if (spec.value == kValueNegDistPow) S.neg_();
  return chain;
}

// The epilogue's gradient in v, turned into the gradient in g.
void values_to_gemm_grad(at::Tensor& G, const at::Tensor& chain, const PairwiseSpec& spec) {
  if (spec.value == kValueNegGemm) {
    G.neg_();
  } else if (chain.defined()) {
    G.mul_(chain);
  }
}

// Runs the strips: S = x[rows] @ ref^T, its pair values, then `epilogue(strip, row0)`, then
// (when `grads`) `accumulate(strip, x_rows, row0)` on the rewritten strip turned into dl/dg.
template <typename Fn, typename Acc>
void for_each_strip(const Prepared& p, const PairwiseSpec& spec, const PairwiseEpilogue& epi, bool grads,
                    Fn&& epilogue, Acc&& accumulate) {
  const int64_t B = p.x.size(0), M = p.ref.size(0);
  const int64_t T = strip_rows(B, M, epi.strip_elems);
  at::Tensor S = at::empty({T, M}, p.x.options());
  const at::Tensor ref_t = p.ref.t();
  for (int64_t row0 = 0; row0 < B; row0 += T) {
    const int64_t t = std::min(T, B - row0);
    at::Tensor strip = S.narrow(0, 0, t);
    const at::Tensor x_rows = p.x.narrow(0, row0, t);
    at::mm_out(strip, x_rows, ref_t);
    const at::Tensor chain = to_values(strip, row0, p.rows, spec);
    epilogue(strip, row0);
    if (!grads) continue;
    values_to_gemm_grad(strip, chain, spec);
    accumulate(strip, x_rows, row0);
  }
}

// Rows that are not normalized (spec.raw_norms): d depends on n_i = ||x_i||^2 too, and
// dl/dn_i = -(1/2) sum_j dl/dg_ij, so x_i's gradient gains -x_i sum_j dl/dg_ij (and r_j's
// -r_j sum_i dl/dg_ij; col_sums collects those sums).
void add_norm_grad(const at::Tensor& G, const at::Tensor& x_rows, int64_t row0, at::Tensor& grad_x,
                   at::Tensor& col_sums) {
  grad_x.narrow(0, row0, G.size(0)).sub_(x_rows * G.sum(1, /*keepdim=*/true));
  col_sums.add_(G.sum(0));
}

// ---------------------------------------------------------------- the symmetric engine

// The strip's view of the rows: its columns are anchors row0..B-1.
PairwiseRows symmetric_strip_rows(const PairwiseRows& rows, int64_t row0) {
  const int64_t W = rows.labels.size(0) - row0;
  return PairwiseRows{rows.labels, rows.labels.narrow(0, row0, W), rows.x_sq, rows.x_sq.narrow(0, row0, W)};
}

// Runs the symmetric strips: S = x[row0:row0+t] x[row0:]^T, its pair values, `fn(strip, row0,
// strip_rows, chain)`.
template <typename Fn>
void for_each_symmetric_strip(const Prepared& p, const PairwiseSpec& spec, int64_t strip_elems, Fn&& fn) {
  const int64_t B = p.x.size(0);
  const int64_t T = strip_rows(B, B, strip_elems);
  at::Tensor S = at::empty({T, B}, p.x.options());
  for (int64_t row0 = 0; row0 < B; row0 += T) {
    const int64_t t = std::min(T, B - row0), W = B - row0;
    at::Tensor strip = S.view(-1).narrow(0, 0, t * W).view({t, W});  // contiguous t x W
    at::mm_out(strip, p.x.narrow(0, row0, t), p.x.narrow(0, row0, W).t());
    const PairwiseRows rows = symmetric_strip_rows(p.rows, row0);
    const at::Tensor chain = to_values(strip, row0, rows, spec);
    fn(strip, row0, rows, chain);
  }
}

// grad[row0:row0+t] += G x[row0:], grad[row0:] += G^T x[row0:row0+t] (the strip's gradient in g).
void accumulate_symmetric(at::Tensor& G, const Prepared& p, int64_t row0, at::Tensor (&grad)[2], bool split,
                          bool maybe_sparse) {
  const int64_t t = G.size(0), W = G.size(1);
  const at::Tensor x_rows = p.x.narrow(0, row0, t), cols = p.x.narrow(0, row0, W);
  maybe_sparse = maybe_sparse ? sparse_override() != 0 : sparse_override() == 1;
  if (split) {
    at::Tensor g_cols[2] = {grad[0].narrow(0, row0, W), grad[1].narrow(0, row0, W)};
    at::Tensor full[2] = {grad[0], grad[1]};
    GradTargets targets{{grad[0].narrow(0, row0, t), grad[1].narrow(0, row0, t)}, {&g_cols[0], &g_cols[1]}, true};
    if (maybe_sparse && try_sparse(G, x_rows, cols, targets)) return;
    const at::Tensor G0 = G.clamp_max(0);
    G.clamp_min_(0);
    accumulate_dense(G0, x_rows, cols, row0, full[0], g_cols[0], false);
    accumulate_dense(G, x_rows, cols, row0, full[1], g_cols[1], false);
    return;
  }
  at::Tensor g_cols = grad[0].narrow(0, row0, W);
  if (maybe_sparse) {
    accumulate_strip_grad(G, x_rows, cols, row0, grad[0], g_cols, false);
  } else {
    accumulate_dense(G, x_rows, cols, row0, grad[0], g_cols, false);
  }
}

}  // namespace

bool symmetric_engine_enabled() {
  const char* v = std::getenv("STRUCTLOSS_FAST_PAIRWISE_SYMMETRIC");
  return v == nullptr || *v != '0';
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_symmetric_forward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const PairwiseSpec& spec, int64_t grad_mode,
    const SymmetricEpilogue& epi) {
  TORCH_CHECK(spec.ref_is_x && !spec.raw_norms && spec.miner == kMinerNone,
              "structloss_fast: the symmetric engine takes references = anchors, normalized rows, no miner");
  const Prepared p = prepare(x_in, labels_in, x_in, labels_in, spec);
  const int64_t B = p.x.size(0), D = p.x.size(1);
  const bool grads = grad_mode != kGradNone;
  const int64_t terms = grads ? spec.terms() : 0;
  at::Tensor row_stats = at::zeros({B, kNumPairStats}, p.x.options());
  at::Tensor grad_x = at::zeros({terms, B, D}, p.x.options());
  at::Tensor grad_ref = at::zeros({0, B, D}, p.x.options());
  if (B == 0) return {row_stats, grad_x, grad_ref};
  at::Tensor acc = at::zeros({B, epi.acc_cols}, p.x.options());
  at::Tensor gx[2];
  for (int64_t k = 0; k < 2; ++k) gx[k] = k < terms ? grad_x.select(0, k) : at::Tensor();
  const at::Tensor unit = at::ones({B, spec.terms()}, p.x.options());
  const auto to_grad = [&](at::Tensor& strip, int64_t row0, const at::Tensor& chain) {
    values_to_gemm_grad(strip, chain, spec);
    accumulate_symmetric(strip, p, row0, gx, terms == 2, epi.sparse_grad);
  };
  const auto grad_pass = [&](at::Tensor& strip, int64_t row0, const PairwiseRows& rows, const at::Tensor& chain) {
    epi.gradient(strip, row0, rows, spec, row_stats, unit);
    to_grad(strip, row0, chain);
  };
  for_each_symmetric_strip(p, spec, epi.strip_elems,
                           [&](at::Tensor& strip, int64_t row0, const PairwiseRows& rows, const at::Tensor& chain) {
                             const bool one_pass_grad = grads && !epi.two_pass;
                             epi.accumulate(strip, row0, rows, spec, acc, one_pass_grad);
                             if (one_pass_grad) to_grad(strip, row0, chain);
                           });
  epi.finish(acc, p.rows, spec, row_stats);
  if (grads && epi.two_pass) for_each_symmetric_strip(p, spec, epi.strip_elems, grad_pass);
  return {row_stats, grad_x, grad_ref};
}

std::tuple<at::Tensor, at::Tensor> pairwise_symmetric_backward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& row_stats_in,
    const at::Tensor& row_weights_in, const PairwiseSpec& spec, const SymmetricEpilogue& epi) {
  const Prepared p = prepare(x_in, labels_in, x_in, labels_in, spec);
  const int64_t B = p.x.size(0), D = p.x.size(1);
  const at::Tensor row_stats = row_stats_in.to(p.x.scalar_type()).contiguous();
  const at::Tensor row_weights = row_weights_in.to(p.x.scalar_type()).contiguous();
  at::Tensor grad[2] = {at::zeros({B, D}, p.x.options()), at::Tensor()};
  if (B > 0) {
    for_each_symmetric_strip(p, spec, epi.strip_elems,
                             [&](at::Tensor& strip, int64_t row0, const PairwiseRows& rows, const at::Tensor& chain) {
                               epi.gradient(strip, row0, rows, spec, row_stats, row_weights);
                               values_to_gemm_grad(strip, chain, spec);
                               accumulate_symmetric(strip, p, row0, grad, false, epi.sparse_grad);
                             });
  }
  return {grad[0], at::zeros({0, D}, p.x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_forward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const PairwiseSpec& spec, int64_t grad_mode, const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  TORCH_CHECK(grad_mode >= kGradNone && grad_mode < kNumPairGradModes, "structloss_fast: unknown grad_mode ", grad_mode);
  const Prepared p = prepare(x_in, labels_in, ref_in, ref_labels_in, spec);
  const int64_t B = p.x.size(0), M = p.ref.size(0), D = p.x.size(1);
  const bool grads = grad_mode != kGradNone;
  TORCH_CHECK(!(grads && spec.raw_norms), "structloss_fast: rows that are not normalized take their gradient "
              "from pairwise_loss_backward (grad_mode must be 0)");
  const int64_t terms = grads ? spec.terms() : 0;
  const bool split = terms == 2;

  at::Tensor row_stats = at::zeros({B, kNumPairStats}, p.x.options());
  at::Tensor grad_x = at::zeros({terms, B, D}, p.x.options());
  at::Tensor grad_ref = at::zeros({grad_mode == kGradXRef && !spec.ref_is_x ? terms : 0, M, D}, p.x.options());
  // Per term: grad_x[k] (and grad_ref[k], empty when not wanted).
  at::Tensor gx[2], gr[2];
  for (int64_t k = 0; k < 2; ++k) {
    gx[k] = k < terms ? grad_x.select(0, k) : at::Tensor();
    gr[k] = k < grad_ref.size(0) ? grad_ref.select(0, k) : p.x.new_zeros({0, D});
  }

  if (B > 0 && M > 0) {
    for_each_strip(
        p, spec, epi, grads,
        [&](at::Tensor& strip, int64_t row0) { epi.forward(strip, row0, p.rows, spec, grads, row_stats); },
        [&](at::Tensor& strip, const at::Tensor& x_rows, int64_t row0) {
          if (split) {
            accumulate_strip_grad_split(strip, x_rows, p.ref, row0, gx, gr, spec.ref_is_x);
          } else {
            accumulate_strip_grad(strip, x_rows, p.ref, row0, gx[0], gr[0], spec.ref_is_x);
          }
        });
  }
  return {row_stats, grad_x, grad_ref};
}

std::tuple<at::Tensor, at::Tensor> pairwise_backward_driver(
    const at::Tensor& x_in, const at::Tensor& labels_in, const at::Tensor& ref_in, const at::Tensor& ref_labels_in,
    const at::Tensor& row_stats_in, const at::Tensor& row_weights_in, const PairwiseSpec& spec, bool ref_grad,
    const PairwiseEpilogue& epi) {
  check_pairwise_inputs(x_in, labels_in, ref_in, ref_labels_in, spec);
  const Prepared p = prepare(x_in, labels_in, ref_in, ref_labels_in, spec);
  const int64_t B = p.x.size(0), M = p.ref.size(0), D = p.x.size(1);
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == B && row_stats_in.size(1) == kNumPairStats,
              "structloss_fast: row_stats must be (B, ", kNumPairStats, ")");
  TORCH_CHECK(row_weights_in.dim() == 2 && row_weights_in.size(0) == B && row_weights_in.size(1) == spec.terms(),
              "structloss_fast: row_weights must be (B, ", spec.terms(), ")");
  const at::Tensor row_stats = row_stats_in.to(p.x.scalar_type()).contiguous();
  const at::Tensor row_weights = row_weights_in.to(p.x.scalar_type()).contiguous();

  at::Tensor grad_x = at::zeros({B, D}, p.x.options());
  at::Tensor grad_ref = at::zeros({ref_grad && !spec.ref_is_x ? M : 0, D}, p.x.options());
  if (B == 0 || M == 0) return {grad_x, grad_ref};
  at::Tensor col_sums = spec.raw_norms ? at::zeros({M}, p.x.options()) : at::Tensor();
  for_each_strip(
      p, spec, epi, /*grads=*/true,
      [&](at::Tensor& strip, int64_t row0) { epi.backward(strip, row0, p.rows, spec, row_stats, row_weights); },
      [&](at::Tensor& strip, const at::Tensor& x_rows, int64_t row0) {
        if (spec.raw_norms) add_norm_grad(strip, x_rows, row0, grad_x, col_sums);
        accumulate_strip_grad(strip, x_rows, p.ref, row0, grad_x, grad_ref, spec.ref_is_x);
      });
  if (spec.raw_norms) {
    if (spec.ref_is_x) {
      grad_x.sub_(p.x * col_sums.unsqueeze(1));
    } else if (grad_ref.size(0) > 0) {
      grad_ref.sub_(p.ref * col_sums.unsqueeze(1));
    }
  }
  return {grad_x, grad_ref};
}

}  // namespace structloss_fast
