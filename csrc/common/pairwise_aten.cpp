// The pairwise epilogue written with ATen ops on the T x M strip, for any device. The CUDA
// backend uses it for the losses that have no dedicated CUDA kernel (triplet mining with sorts
// and binary searches among them); on CPU it is reachable with STRUCTLOSS_FAST_PAIRWISE_EPILOGUE=aten, which is how
// the tests check it without a GPU. Same statistics and gradients as the CPU loops.
#include <ATen/ATen.h>

#include <limits>

#include "pairwise_driver.h"
#include "pairwise_math.h"

namespace structloss_fast {
namespace {

using at::Tensor;

struct Masks {
  Tensor same, pos, neg, npos, nneg;
};

Masks make_masks(const Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec) {
  TORCH_CHECK(spec.miner == kMinerNone, "structloss_fast: the ATen pairwise epilogue has no fused miner");
  const int64_t t = S.size(0), M = S.size(1);
  Masks m;
  m.same = rows.labels.narrow(0, row0, t).unsqueeze(1).eq(rows.ref_labels.unsqueeze(0));
  m.pos = m.same.clone();
  if (spec.self_offset >= 0) {
    const Tensor cols =
        at::arange(row0, row0 + t, rows.labels.options().dtype(at::kLong)).add(spec.self_offset).remainder(M);
    m.pos.scatter_(1, cols.unsqueeze(1), false);
  }
  m.neg = m.same.logical_not();
  m.npos = m.pos.sum(1).to(S.scalar_type());
  m.nneg = m.neg.sum(1).to(S.scalar_type());
  return m;
}

Tensor masked_lse(const Tensor& a, const Tensor& mask) {
  return a.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()).logsumexp(1);
}

Tensor counts_nonzero(const Tensor& v) { return v.le(0).logical_not().to(v.scalar_type()); }

// d/dx relu(x) (0 at 0), NaN kept.
Tensor relu_grad(const Tensor& x) { return at::where(x.gt(0), at::ones_like(x), at::where(x.isnan(), x, at::zeros_like(x))); }

// The distance losses' d: the strip itself when it holds distances (spec.direct()), else
// ||x_i - r_j|| from g and the rows' squared norms; and dd/d(strip value).
Tensor distance(const Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec) {
  if (spec.direct()) return S;
  return (rows.x_sq.narrow(0, row0, S.size(0)).unsqueeze(1) + rows.ref_sq.unsqueeze(0) - 2 * S).clamp_min(0).sqrt();
}

Tensor distance_grad(const Tensor& d, const PairwiseSpec& spec) {
  if (spec.direct()) return at::ones_like(d);
  return at::where(d.gt(0), -d.reciprocal(), at::where(d.isnan(), d, at::zeros_like(d)));
}

// Logits and their derivatives for the two-set losses.
std::pair<Tensor, Tensor> twoset_logits(const Tensor& S, const Tensor& same, const PairwiseSpec& spec) {
  const double p0 = spec.p[0], p1 = spec.p[1], p2 = spec.p[2];
  if (spec.loss == kCircle) {
    const Tensor w_pos = (1 + p0 - S).relu(), w_neg = (S + p0).relu();
    return {at::where(same, -p1 * w_pos * (S - (1 - p0)), p1 * w_neg * (S - p0)), at::where(same, -p1 * w_pos, p1 * w_neg)};
  }
  if (spec.loss == kUnified) {
    return {at::where(same, -p1 * S, p1 * (S + p0)), at::where(same, at::full_like(S, -p1), at::full_like(S, p1))};
  }
  // multi-similarity
  return {at::where(same, p0 * (p2 - S), p1 * (S - p2)), at::where(same, at::full_like(S, -p0), at::full_like(S, p1))};
}

struct TwoSet {
  Tensor a, da, lse_p, lse_n, loss, dlse_p, dlse_n, counted;
};

TwoSet twoset(const Tensor& S, const Masks& m, const PairwiseSpec& spec) {
  TwoSet r;
  std::tie(r.a, r.da) = twoset_logits(S, m.same, spec);
  r.lse_p = masked_lse(r.a, m.pos);
  r.lse_n = masked_lse(r.a, m.neg);
  if (spec.loss == kMultiSimilarity) {
    const Tensor zero = at::zeros_like(r.lse_p);
    r.loss = at::logaddexp(r.lse_p, zero) / spec.p[0] + at::logaddexp(r.lse_n, zero) / spec.p[1];
    r.dlse_p = r.lse_p.sigmoid() / spec.p[0];
    r.dlse_n = r.lse_n.sigmoid() / spec.p[1];
    r.counted = at::ones_like(r.loss);
  } else {
    const Tensor both = m.npos.gt(0).logical_and(m.nneg.gt(0));
    const Tensor z = at::where(both, r.lse_p + r.lse_n, at::zeros_like(r.lse_p));
    r.loss = at::where(both, at::softplus(z, 1, 20), at::zeros_like(z));
    r.dlse_p = at::where(both, at::where(z.gt(20), at::ones_like(z), z.sigmoid()), at::zeros_like(z));
    r.dlse_n = r.dlse_p;
    r.counted = counts_nonzero(r.loss);
  }
  return r;
}

Tensor twoset_grad(const TwoSet& r, const Masks& m, const Tensor& w) {
  const Tensor g_pos = (w * r.dlse_p).unsqueeze(1) * (r.a - r.lse_p.unsqueeze(1)).exp() * r.da;
  const Tensor g_neg = (w * r.dlse_n).unsqueeze(1) * (r.a - r.lse_n.unsqueeze(1)).exp() * r.da;
  return at::where(m.pos, g_pos, at::where(m.neg, g_neg, at::zeros_like(r.a)));
}

struct Triplets {
  Tensor d, loss, count, kp, cntn, has_nan;
};

// All triplets of each anchor by sorting: for a positive p, the active negatives are those with
// d_n < d_p + margin (a prefix of the sorted negatives); for a negative n, the active
// positives are those with d_p > d_n - margin.
Triplets all_triplets(const Tensor& d, const Masks& m, double margin) {
  Triplets r;
  const double inf = std::numeric_limits<double>::infinity();
  r.d = d;
  const Tensor dn_sorted = std::get<0>(at::where(m.neg, r.d, at::full_like(r.d, inf)).sort(1)).contiguous();
  const Tensor dp_sorted = std::get<0>(at::where(m.pos, r.d, at::full_like(r.d, inf)).sort(1)).contiguous();
  const Tensor thr = (r.d + margin).contiguous();
  const Tensor k = at::searchsorted(dn_sorted, thr, /*out_int32=*/false, /*right=*/false);
  const Tensor finite_n = at::where(dn_sorted.isinf(), at::zeros_like(dn_sorted), dn_sorted).to(at::kDouble);
  const Tensor prefix = at::cat({at::zeros({d.size(0), 1}, finite_n.options()), finite_n.cumsum(1)}, 1);
  const Tensor contrib = k.to(at::kDouble) * thr.to(at::kDouble) - prefix.gather(1, k);
  r.loss = at::where(m.pos, contrib, at::zeros_like(contrib)).sum(1).to(d.scalar_type());
  r.kp = at::where(m.pos, k.to(d.scalar_type()), at::zeros_like(r.d));
  r.count = r.kp.sum(1);
  const Tensor below = at::searchsorted(dp_sorted, (r.d - margin).contiguous(), false, /*right=*/true);
  r.cntn = at::where(m.neg, m.npos.unsqueeze(1) - below.to(d.scalar_type()), at::zeros_like(r.d));
  r.has_nan = r.d.isnan().logical_and(m.pos.logical_or(m.neg)).any(1);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  r.loss = at::where(r.has_nan, at::full_like(r.loss, nan), r.loss);
  r.count = at::where(r.has_nan, at::ones_like(r.count), r.count);
  return r;
}

struct Hardest {
  Tensor d, jp, jn, best_p, best_n, loss, counted;
};

Hardest hardest(const Tensor& d, const Masks& m, double margin) {
  Hardest h;
  const double inf = std::numeric_limits<double>::infinity();
  h.d = d;
  h.jp = at::where(m.pos, h.d, at::full_like(h.d, -inf)).argmax(1, /*keepdim=*/true);
  h.jn = at::where(m.neg, h.d, at::full_like(h.d, inf)).argmin(1, /*keepdim=*/true);
  h.best_p = h.d.gather(1, h.jp).squeeze(1);
  h.best_n = h.d.gather(1, h.jn).squeeze(1);
  const Tensor valid = m.npos.gt(0).logical_and(m.nneg.gt(0));
  h.loss = at::where(valid, ((h.best_p - h.best_n) + margin).relu(), at::zeros_like(h.best_p));
  h.counted = valid.logical_and(h.loss.le(0).logical_not()).to(d.scalar_type());
  return h;
}

Tensor hardest_grad(const Hardest& h, const Tensor& w, const PairwiseSpec& spec) {
  const Tensor g = w * h.counted * relu_grad(h.loss);
  Tensor G = at::zeros_like(h.d);
  G.scatter_add_(1, h.jp, (g * distance_grad(h.best_p, spec)).unsqueeze(1));
  G.scatter_add_(1, h.jn, (-g * distance_grad(h.best_n, spec)).unsqueeze(1));
  return G;
}

void write_stats(Tensor& st, const Tensor& aux0, const Tensor& aux1, const Tensor& sum0, const Tensor& cnt0,
                 const Masks& m) {
  if (aux0.defined()) st.select(1, kPairAux0).copy_(aux0);
  if (aux1.defined()) st.select(1, kPairAux1).copy_(aux1);
  st.select(1, kPairSum0).copy_(sum0);
  st.select(1, kPairCount0).copy_(cnt0);
  st.select(1, kPairNumPos).copy_(m.npos);
  st.select(1, kPairNumNeg).copy_(m.nneg);
}

void aten_forward(Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, bool want_grad,
                  Tensor& row_stats) {
  const Masks m = make_masks(S, row0, rows, spec);
  Tensor st = row_stats.narrow(0, row0, S.size(0));
  const double t = spec.p[0];
  Tensor G;
  switch (spec.loss) {
    case kCircle: case kUnified: case kMultiSimilarity: {
      const TwoSet r = twoset(S, m, spec);
      write_stats(st, r.lse_p, r.lse_n, r.loss, r.counted, m);
      if (want_grad) G = twoset_grad(r, m, r.counted);
      break;
    }
    case kSupCon: {
      const Tensor a = S / t;
      const Tensor lse = masked_lse(a, m.pos.logical_or(m.neg));
      const Tensor mean_p = at::where(m.pos, a, at::zeros_like(a)).sum(1) / m.npos.clamp_min(1);
      const Tensor loss = at::where(m.npos.gt(0), lse - mean_p, at::zeros_like(lse));
      const Tensor counted = counts_nonzero(loss);
      write_stats(st, lse, mean_p, loss, counted, m);
      if (want_grad) {
        const Tensor soft = at::where(m.pos.logical_or(m.neg), (a - lse.unsqueeze(1)).exp(), at::zeros_like(a));
        G = (counted / t).unsqueeze(1) * (soft - m.pos.to(a.scalar_type()) / m.npos.clamp_min(1).unsqueeze(1));
      }
      break;
    }
    case kNTXent: {
      const Tensor a = S / t;
      const Tensor lse_n = masked_lse(a, m.neg);
      const Tensor z = lse_n.unsqueeze(1) - a;
      const Tensor loss = at::where(m.pos, at::logaddexp(z, at::zeros_like(z)), at::zeros_like(z)).sum(1);
      const Tensor c = at::where(m.pos, z.sigmoid(), at::zeros_like(z)).sum(1);
      write_stats(st, lse_n, c, loss, m.npos, m);
      if (want_grad) {
        G = at::where(m.pos, -z.sigmoid(), at::where(m.neg, c.unsqueeze(1) * (-z).exp(), at::zeros_like(z))) / t;
      }
      break;
    }
    case kContrastive: {
      const Tensor d = distance(S, row0, rows, spec);
      const Tensor lp = at::where(m.pos, (d - spec.p[0]).relu(), at::zeros_like(d));
      const Tensor ln = at::where(m.neg, (spec.p[1] - d).relu(), at::zeros_like(d));
      write_stats(st, Tensor(), Tensor(), lp.sum(1), (counts_nonzero(lp) * m.pos).sum(1), m);
      st.select(1, kPairSum1).copy_(ln.sum(1));
      st.select(1, kPairCount1).copy_((counts_nonzero(ln) * m.neg).sum(1));
      if (want_grad) {  // unit weights; the driver splits the terms by sign (term 0 <= 0 <= term 1)
        const Tensor dd = distance_grad(d, spec);
        G = at::where(m.pos, relu_grad(d - spec.p[0]) * dd,
                      at::where(m.neg, -relu_grad(spec.p[1] - d) * dd, at::zeros_like(d)));
      }
      break;
    }
    case kTripletAll: {
      const Triplets r = all_triplets(distance(S, row0, rows, spec), m, spec.p[0]);
      write_stats(st, m.npos * m.nneg, Tensor(), r.loss, r.count, m);
      if (want_grad) {
        const Tensor dd = distance_grad(r.d, spec);
        G = at::where(m.pos, r.kp * dd, at::where(m.neg, -r.cntn * dd, at::zeros_like(r.d)));
        G = at::where(r.has_nan.unsqueeze(1), at::full_like(G, std::numeric_limits<double>::quiet_NaN()), G);
      }
      break;
    }
    case kTripletHard: {
      const Hardest h = hardest(distance(S, row0, rows, spec), m, spec.p[0]);
      const Tensor valid = m.npos.gt(0).logical_and(m.nneg.gt(0));
      const Tensor none = at::full_like(h.best_p, -1);
      write_stats(st, at::where(valid, h.jp.squeeze(1).to(S.scalar_type()), none),
                  at::where(valid, h.jn.squeeze(1).to(S.scalar_type()), none), h.loss, h.counted, m);
      if (want_grad) G = hardest_grad(h, at::ones_like(h.loss), spec);
      break;
    }
    default:
      TORCH_CHECK(false, "structloss_fast: unknown pairwise loss ", spec.loss);
  }
  if (want_grad) S.copy_(G);
}

void aten_backward(Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec,
                   const Tensor& row_stats, const Tensor& row_weights) {
  const Masks m = make_masks(S, row0, rows, spec);
  const Tensor st = row_stats.narrow(0, row0, S.size(0));
  const Tensor w = row_weights.narrow(0, row0, S.size(0));
  const Tensor w0 = w.select(1, 0);
  const double t = spec.p[0];
  Tensor G;
  switch (spec.loss) {
    case kCircle: case kUnified: case kMultiSimilarity: {
      TwoSet r = twoset(S, m, spec);
      r.lse_p = st.select(1, kPairAux0);  // the forward's statistics, as the CPU kernel uses them
      r.lse_n = st.select(1, kPairAux1);
      const Tensor counted = pair_loss_row_counted(spec.loss) ? st.select(1, kPairCount0) : at::ones_like(w0);
      G = twoset_grad(r, m, w0 * counted);
      break;
    }
    case kSupCon: {
      const Tensor a = S / t;
      const Tensor lse = st.select(1, kPairAux0);
      const Tensor soft = at::where(m.pos.logical_or(m.neg), (a - lse.unsqueeze(1)).exp(), at::zeros_like(a));
      G = (w0 * st.select(1, kPairCount0) / t).unsqueeze(1) *
          (soft - m.pos.to(a.scalar_type()) / m.npos.clamp_min(1).unsqueeze(1));
      break;
    }
    case kNTXent: {
      const Tensor a = S / t;
      const Tensor z = st.select(1, kPairAux0).unsqueeze(1) - a;
      const Tensor c = st.select(1, kPairAux1);
      G = (w0 / t).unsqueeze(1) *
          at::where(m.pos, -z.sigmoid(), at::where(m.neg, c.unsqueeze(1) * (-z).exp(), at::zeros_like(z)));
      break;
    }
    case kContrastive: {
      const Tensor d = distance(S, row0, rows, spec);
      const Tensor dd = distance_grad(d, spec);
      const Tensor g_pos = w0.unsqueeze(1) * relu_grad(d - spec.p[0]) * dd;
      const Tensor g_neg = -w.select(1, 1).unsqueeze(1) * relu_grad(spec.p[1] - d) * dd;
      G = at::where(m.pos, g_pos, at::where(m.neg, g_neg, at::zeros_like(d)));
      break;
    }
    case kTripletAll: {
      const Triplets r = all_triplets(distance(S, row0, rows, spec), m, spec.p[0]);
      const Tensor dd = distance_grad(r.d, spec);
      const Tensor wc = w0.unsqueeze(1);
      G = at::where(m.pos, wc * r.kp * dd, at::where(m.neg, -wc * r.cntn * dd, at::zeros_like(r.d)));
      G = at::where(r.has_nan.unsqueeze(1).logical_and(w0.ne(0).unsqueeze(1)),
                    at::full_like(G, std::numeric_limits<double>::quiet_NaN()), G);
      break;
    }
    case kTripletHard: {
      G = hardest_grad(hardest(distance(S, row0, rows, spec), m, spec.p[0]), w0, spec);
      break;
    }
    default:
      TORCH_CHECK(false, "structloss_fast: unknown pairwise loss ", spec.loss);
  }
  S.copy_(G);
}

}  // namespace

// A strip's ATen temporaries are several times its size: a smaller strip than the kernels'.
const PairwiseEpilogue kAtenEpilogue{&aten_forward, &aten_backward, int64_t(1) << 21};

}  // namespace structloss_fast
