// CPU kernels of ProxyAnchor (Kim et al., CVPR 2020), the softmax family's per-proxy loss:
// for each proxy c a log-sum-exp over the batch (its column of the N x C cosines), once over the
// rows of class c and once over the others. The rows are walked in chunks (one GEMM each);
// every column keeps an online maximum and sum of exponentials across chunks, so the N x C
// matrix never exists. Columns are split between threads (no atomics: deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "../common/ids.h"
#include "../common/math.h"

namespace structloss_fast {
namespace {

using at::Tensor;

// 16 MiB of float per chunk of cosines.
constexpr int64_t kPaChunkElems = int64_t(1) << 22;

// fn(S, r0, t) for each chunk of t rows from r0, S = x[r0 : r0 + t] P^T (one GEMM, one buffer).
template <typename Fn>
void for_each_chunk(const Tensor& x, const Tensor& P, Fn&& fn) {
  const int64_t N = x.size(0), C = P.size(0);
  int64_t rows = std::max<int64_t>(1, kPaChunkElems / std::max<int64_t>(C, 1));
  if (rows >= 16) rows -= rows % 16;
  rows = std::min(rows, std::max<int64_t>(N, 1));
  Tensor buf = at::empty({rows, C}, x.options());
  const Tensor Pt = P.t();
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t t = std::min(rows, N - r0);
    Tensor S = buf.narrow(0, 0, t);
    at::mm_out(S, x.narrow(0, r0, t), Pt);
    fn(S, r0, t);
  }
}

void check_inputs(const Tensor& x, const Tensor& P, const Tensor& labels, at::ArrayRef<double> params) {
  TORCH_CHECK(x.dim() == 2 && P.dim() == 2 && x.size(1) == P.size(1),
              "structloss_fast: proxy_anchor_loss takes x (N, D) and proxies (C, D)");
  TORCH_CHECK(x.scalar_type() == P.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "structloss_fast: proxy_anchor_loss takes float32 or float64 x and proxies of one dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "structloss_fast: labels must be (N,) int64");
  TORCH_CHECK(params.size() == 2, "structloss_fast: proxy_anchor_loss params are (alpha, margin)");
  TORCH_CHECK(labels.device() == x.device() && P.device() == x.device(), "structloss_fast: all inputs must be on one device");
  const int64_t C = P.size(0);
  const Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0, n = lab.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < C, "structloss_fast: label ", y[i], " at position ", i,
                      " is out of range for ", C, " proxies");
  }
}

// The negative pairs of columns [c0, c1) over the t rows of a chunk S (t x C): merges the
// chunk's maximum and sum of exp(alpha (s + margin)) into the running (mx, sm) of each column.
template <typename T>
SLF_CPU_MULTIVERSION void neg_columns(const T* S, int64_t t, int64_t C, const int64_t* y, T alpha, T margin, T* mx,
                                      T* sm, T* cm, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  for (int64_t c = 0; c < n; ++c) cm[c] = neg_inf<T>();
  for (int64_t i = 0; i < t; ++i) {
    const T* s = S + i * C + c0;
    const int64_t yl = y[i] - c0;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const T v = c == yl ? neg_inf<T>() : alpha * (s[c] + margin);
      cm[c] = cm[c] > v ? cm[c] : v;
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    const T m_old = mx[c0 + c], m_new = m_old > cm[c] ? m_old : cm[c];
    // A column without a finite term so far keeps sum 0 (exp(-inf - -inf) would be NaN).
    sm[c0 + c] = m_old == neg_inf<T>() ? T(0) : sm[c0 + c] * exp_(m_old - m_new);
    mx[c0 + c] = m_new;
    cm[c] = m_new == neg_inf<T>() ? T(0) : m_new;  // the shift of this chunk's sum
  }
  for (int64_t i = 0; i < t; ++i) {
    const T* s = S + i * C + c0;
    const int64_t yl = y[i] - c0;
    T* out = sm + c0;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const T e = exp_fast(alpha * (s[c] + margin) - cm[c]);
      out[c] += c == yl ? T(0) : e;
    }
  }
}

Tensor proxy_anchor_loss_cpu(const Tensor& x_in, const Tensor& P_in, const Tensor& labels, at::ArrayRef<double> params) {
  check_inputs(x_in, P_in, labels, params);
  const Tensor x = x_in.contiguous(), P = P_in.contiguous(), lab = labels.contiguous();
  const int64_t N = x.size(0), C = P.size(0);
  Tensor stats = at::zeros({C, kNumProxyAnchorStats}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "structloss_fast_proxy_anchor", [&] {
    using T = scalar_t;
    const T alpha = static_cast<T>(params[0]), margin = static_cast<T>(params[1]);
    std::vector<T> nmx(C, neg_inf<T>()), nsm(C, T(0)), pmx(C, neg_inf<T>()), psm(C, T(0)), cm(C);
    std::vector<int64_t> npos(C, 0);
    const int64_t* y = lab.data_ptr<int64_t>();
    for_each_chunk(x, P, [&](Tensor& S, int64_t r0, int64_t t) {
      const T* Sp = S.data_ptr<T>();
      at::parallel_for(0, C, 512, [&](int64_t c0, int64_t c1) {
        neg_columns(Sp, t, C, y + r0, alpha, margin, nmx.data(), nsm.data(), cm.data() + c0, c0, c1);
      });
      // One positive per row: an online log-sum-exp per class, in row order.
      for (int64_t i = 0; i < t; ++i) {
        const int64_t c = y[r0 + i];
        const T a = -alpha * (Sp[i * C + c] - margin);
        ++npos[c];
        if (a > pmx[c]) {
          psm[c] = (pmx[c] == neg_inf<T>() ? T(0) : psm[c] * exp_(pmx[c] - a)) + T(1);
          pmx[c] = a;
        } else {
          psm[c] += exp_(a - pmx[c]);  // NaN a lands here and makes the sum NaN
        }
      }
    });
    T* st = stats.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const int64_t nneg = N - npos[c];
      st[c * kNumProxyAnchorStats + kPaPosTerm] = npos[c] > 0 ? softplus_exact(pmx[c] + log_(psm[c])) : T(0);
      st[c * kNumProxyAnchorStats + kPaNegTerm] = nneg > 0 ? softplus_exact(nmx[c] + log_(nsm[c])) : T(0);
      st[c * kNumProxyAnchorStats + kPaNumPos] = static_cast<T>(npos[c]);
      st[c * kNumProxyAnchorStats + kPaNumNeg] = static_cast<T>(nneg);
    }
  });
  return stats;
}

// Overwrites the chunk S (t x C) with d loss / d s: alpha w_neg,c e^{a - neg_c} off the label,
// -alpha w_pos,c e^{a - pos_c} at it (d/da log(1 + sum e^a) = e^{a - log(1 + sum e^a)}).
template <typename T>
SLF_CPU_MULTIVERSION void grad_rows(T* S, int64_t C, const int64_t* y, T alpha, T margin, const T* neg_term,
                                    const T* neg_w, const T* pos_term, const T* pos_w, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    T* s = S + i * C;
    const int64_t yi = y[i];
    const T sy = s[yi];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) s[c] = neg_w[c] * exp_fast(alpha * (s[c] + margin) - neg_term[c]);
    s[yi] = -pos_w[yi] * exp_(-alpha * (sy - margin) - pos_term[yi]);
  }
}

std::tuple<Tensor, Tensor> proxy_anchor_loss_backward_cpu(const Tensor& x_in, const Tensor& P_in, const Tensor& labels,
                                                          const Tensor& class_stats, const Tensor& class_weights,
                                                          at::ArrayRef<double> params, std::array<bool, 2> grad_mask) {
  check_inputs(x_in, P_in, labels, params);
  const Tensor x = x_in.contiguous(), P = P_in.contiguous(), lab = labels.contiguous();
  const int64_t N = x.size(0), C = P.size(0), D = x.size(1);
  TORCH_CHECK(class_stats.dim() == 2 && class_stats.size(0) == C && class_stats.size(1) == kNumProxyAnchorStats,
              "structloss_fast: class_stats must be (C, ", kNumProxyAnchorStats, ")");
  TORCH_CHECK(class_weights.dim() == 2 && class_weights.size(0) == C && class_weights.size(1) == 2,
              "structloss_fast: class_weights must be (C, 2)");
  Tensor gx = at::zeros({grad_mask[0] ? N : 0, D}, x.options());
  Tensor gP = at::zeros({grad_mask[1] ? C : 0, D}, x.options());
  if (N == 0 || !(grad_mask[0] || grad_mask[1])) return {gx, gP};
  const double alpha_d = params[0];
  // Columns of the statistics and weights as contiguous vectors; alpha folded into the weights.
  const Tensor st = class_stats.to(x.scalar_type());
  const Tensor w = class_weights.to(x.scalar_type());
  const Tensor pos_term = st.select(1, kPaPosTerm).contiguous(), neg_term = st.select(1, kPaNegTerm).contiguous();
  const Tensor pos_w = (w.select(1, 0) * alpha_d).contiguous(), neg_w = (w.select(1, 1) * alpha_d).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "structloss_fast_proxy_anchor_bwd", [&] {
    using T = scalar_t;
    const T alpha = static_cast<T>(params[0]), margin = static_cast<T>(params[1]);
    const int64_t* y = lab.data_ptr<int64_t>();
    for_each_chunk(x, P, [&](Tensor& S, int64_t r0, int64_t t) {
      T* Sp = S.data_ptr<T>();
      at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        grad_rows(Sp, C, y + r0, alpha, margin, neg_term.data_ptr<T>(), neg_w.data_ptr<T>(), pos_term.data_ptr<T>(),
                  pos_w.data_ptr<T>(), b, e);
      });
      if (grad_mask[0]) gx.narrow(0, r0, t).addmm_(S, P);
      if (grad_mask[1]) gP.addmm_(S.t(), x.narrow(0, r0, t));
    });
  });
  return {gx, gP};
}

}  // namespace

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("proxy_anchor_loss", &proxy_anchor_loss_cpu);
  m.impl("proxy_anchor_loss_backward", &proxy_anchor_loss_backward_cpu);
}

}  // namespace structloss_fast
