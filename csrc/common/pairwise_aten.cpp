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

// The distance of unit rows from their similarity, sqrt(2 - 2 s): the losses ported from PML
// (generalized lifted structure, MarginLoss) read it (their strips shifted, shift_to_pair_distances).
Tensor unit_distance(const Tensor& s) { return (2 - 2 * s).clamp_min(0).sqrt(); }

// dd/dg of a distance d computed from g: -1/d, 0 at distance 0 (torch.cdist's), NaN kept.
Tensor pair_distance_grad(const Tensor& d) {
  return at::where(d.gt(0), -d.reciprocal(), at::where(d.isnan(), d, at::zeros_like(d)));
}

// The distance losses' d: the strip itself when it holds distances (spec.direct()), else
// ||x_i - r_j|| from g and the rows' squared norms; and dd/d(strip value).
Tensor distance(const Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec) {
  if (spec.direct()) return S;
  return (rows.x_sq.narrow(0, row0, S.size(0)).unsqueeze(1) + rows.ref_sq.unsqueeze(0) - 2 * S).clamp_min(0).sqrt();
}

Tensor distance_grad(const Tensor& d, const PairwiseSpec& spec) {
  return spec.direct() ? at::ones_like(d) : pair_distance_grad(d);
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
  if (spec.loss == kGenLifted) {
    const Tensor d = unit_distance(S);
    const Tensor dd = pair_distance_grad(d);
    return {at::where(same, d - p0, p1 - d), at::where(same, dd, -dd)};
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
  } else if (spec.loss == kGenLifted) {
    const Tensor hp = m.npos.gt(0), hn = m.nneg.gt(0);
    const Tensor zero = at::zeros_like(r.lse_p);
    const Tensor z = at::where(hp, r.lse_p, zero) + at::where(hn, r.lse_n, zero);
    r.loss = z.relu();
    r.dlse_p = at::where(hp, relu_grad(z), zero);
    r.dlse_n = at::where(hn, relu_grad(z), zero);
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

// The NT-Xent and tuplet-margin logits of every pair, as the positive and the negative
// transform, and the derivatives of the positive one (the negative one's is a constant).
struct PerPos {
  Tensor a_pos, da_pos, a_neg;
  double da_neg;
};

PerPos perpos_logits(const Tensor& S, const PairwiseSpec& spec) {
  if (spec.loss == kNTXent) {
    const Tensor a = S / spec.p[0];
    return {a, at::full_like(S, 1.0 / spec.p[0]), a, 1.0 / spec.p[0]};
  }
  const double m = spec.p[0], sc = spec.p[1];  // tuplet margin: cos(theta - m), theta = acos(clamp(s))
  const Tensor c = S.clamp(-1, 1);
  const Tensor sq = (1 - c) * (1 + c);
  const Tensor sin_t = sq.clamp_min(0).sqrt();
  const Tensor a_pos = sc * (c * std::cos(m) + sin_t * std::sin(m));
  Tensor da = at::where(sq.gt(0), std::cos(m) - S * std::sin(m) / sin_t, at::full_like(S, std::cos(m)));
  da = at::where(S.gt(1).logical_or(S.lt(-1)), at::zeros_like(S), sc * da);
  return {a_pos, da, sc * S, sc};
}

Tensor perpos_grad(const PerPos& lg, const Masks& m, const Tensor& lse_n, const Tensor& c, const Tensor& w) {
  const Tensor z = lse_n.unsqueeze(1) - lg.a_pos;
  const Tensor e_neg = (lg.a_neg - lse_n.unsqueeze(1)).exp();
  return w.unsqueeze(1) * at::where(m.pos, -lg.da_pos * z.sigmoid(),
                                    at::where(m.neg, lg.da_neg * c.unsqueeze(1) * e_neg, at::zeros_like(z)));
}

struct Margin {
  Tensor d, lp, ln, np, nn, any;
};

// MarginLoss over all triplets: each positive pair's term recurs |N| times, each negative's |P|.
Margin margin_terms(const Tensor& S, const Masks& m, const Tensor& beta, double margin) {
  Margin r;
  r.d = unit_distance(S);
  const Tensor b = beta.unsqueeze(1);
  r.lp = ((r.d - b) + margin);
  r.ln = ((b - r.d) + margin);
  r.np = m.npos.unsqueeze(1);
  r.nn = m.nneg.unsqueeze(1);
  r.any = m.npos.gt(0).logical_and(m.nneg.gt(0));
  return r;
}

Tensor margin_grad(const Margin& r, const Masks& m, const Tensor& w) {
  const Tensor dd = pair_distance_grad(r.d);
  const Tensor wa = at::where(r.any, w, at::zeros_like(w)).unsqueeze(1);
  return at::where(m.pos, wa * r.nn * relu_grad(r.lp) * dd,
                   at::where(m.neg, -wa * r.np * relu_grad(r.ln) * dd, at::zeros_like(r.d)));
}

Tensor row_params_of(const Tensor& S, int64_t row0, const PairwiseSpec& spec) {
  TORCH_CHECK(spec.row_params != nullptr, "structloss_fast: pairwise loss ", spec.loss,
              " takes a parameter per anchor (op pairwise_loss_rowparam)");
  const Tensor all = at::from_blob(const_cast<void*>(spec.row_params), {row0 + S.size(0)}, S.options());
  return all.narrow(0, row0, S.size(0));
}

struct FastAp {
  Tensor d2, centers, pulse, a, b, loss, has_nan, safe, cum_a, cum_t;
};

// FastAP's soft histograms: pulses (t, M, E) of the squared distances in E = num_bins + 1 bins.
FastAp fastap_hist(const Tensor& S, const Masks& m, int64_t num_bins) {
  FastAp r;
  const int64_t E = num_bins + 1;
  const double delta = 4.0 / static_cast<double>(num_bins);
  r.d2 = (2 - 2 * S).clamp_min(0);
  r.d2 = at::where(S.isnan(), S, r.d2);
  r.centers = at::linspace(0.0, 4.0, E, S.options());
  r.pulse = (1 - (r.d2.unsqueeze(2) - r.centers).abs() / delta).relu();
  const Tensor pf = m.pos.to(S.scalar_type()).unsqueeze(2), nf = m.neg.to(S.scalar_type()).unsqueeze(2);
  r.a = (r.pulse * pf).sum(1);
  r.b = (r.pulse * nf).sum(1);
  r.cum_a = r.a.cumsum(1);
  r.cum_t = (r.a + r.b).cumsum(1);
  r.safe = (r.a * r.cum_a).gt(0).logical_and(r.cum_t.gt(0));
  const Tensor F = at::where(r.safe, r.a * r.cum_a / r.cum_t, at::zeros_like(r.a)).sum(1);
  const Tensor has_pos = m.npos.gt(0);
  r.has_nan = r.d2.isnan().logical_and(m.pos.logical_or(m.neg)).any(1);
  r.loss = at::where(has_pos, 1 - F / m.npos.clamp_min(1), at::zeros_like(F));
  r.loss = at::where(has_pos.logical_and(r.has_nan), at::full_like(F, std::numeric_limits<double>::quiet_NaN()),
                     r.loss);
  return r;
}

Tensor fastap_grad(const FastAp& r, const Masks& m, const Tensor& w, int64_t num_bins) {
  const double delta = 4.0 / static_cast<double>(num_bins);
  const Tensor zero = at::zeros_like(r.a);
  const Tensor t2 = r.cum_t * r.cum_t;
  const Tensor ra = at::where(r.safe, r.a / r.cum_t - r.a * r.cum_a / t2, zero);
  const Tensor qa = at::where(r.safe, r.a * r.cum_a / t2, zero);
  // suffix sums over the bins
  const Tensor R = ra.flip(1).cumsum(1).flip(1), Q = qa.flip(1).cumsum(1).flip(1);
  const Tensor scale = (w / m.npos.clamp_min(1)).unsqueeze(1);
  const Tensor dla = -scale * (at::where(r.safe, r.cum_a / r.cum_t, zero) + R);
  const Tensor dlb = scale * Q;
  const Tensor u = r.d2.unsqueeze(2) - r.centers;
  const Tensor dpulse = at::where((1 - u.abs() / delta).gt(0), -u.sign() / delta, at::zeros_like(u));
  const Tensor gp = (dpulse * dla.unsqueeze(1)).sum(2), gn = (dpulse * dlb.unsqueeze(1)).sum(2);
  Tensor G = at::where(m.pos, gp, at::where(m.neg, gn, at::zeros_like(r.d2))) *
             at::where(r.d2.gt(0), at::full_like(r.d2, -2.0), at::zeros_like(r.d2));
  G = at::where(m.npos.gt(0).logical_and(w.ne(0)).unsqueeze(1), G, at::zeros_like(G));
  return at::where(r.has_nan.logical_and(m.npos.gt(0)).logical_and(w.ne(0)).unsqueeze(1),
                   at::full_like(G, std::numeric_limits<double>::quiet_NaN()), G);
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

// The ported distance losses read the strip through unit_distance(s) = sqrt(2 - 2 s): shifting
// it by (2 - n_i - n_j) / 2 gives the distance of the normalized rows themselves (a zero row at
// distance 1, as PML's LpDistance), with the same gradient (the CPU kernels do the same).
void shift_to_pair_distances(Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec) {
  if ((spec.loss != kGenLifted && spec.loss != kMarginAll && spec.loss != kFastAp) || spec.direct()) return;
  S.add_((2 - rows.x_sq.narrow(0, row0, S.size(0)).unsqueeze(1) - rows.ref_sq.unsqueeze(0)) * 0.5);
}

void aten_forward(Tensor& S, int64_t row0, const PairwiseRows& rows, const PairwiseSpec& spec, bool want_grad,
                  Tensor& row_stats) {
  shift_to_pair_distances(S, row0, rows, spec);
  const Masks m = make_masks(S, row0, rows, spec);
  Tensor st = row_stats.narrow(0, row0, S.size(0));
  const double t = spec.p[0];
  Tensor G;
  switch (spec.loss) {
    case kCircle: case kUnified: case kMultiSimilarity: case kGenLifted: {
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
    case kNTXent: case kTupletMargin: {
      const PerPos lg = perpos_logits(S, spec);
      const Tensor lse_n = masked_lse(lg.a_neg, m.neg);
      const Tensor z = lse_n.unsqueeze(1) - lg.a_pos;
      const Tensor loss = at::where(m.pos, at::logaddexp(z, at::zeros_like(z)), at::zeros_like(z)).sum(1);
      const Tensor c = at::where(m.pos, z.sigmoid(), at::zeros_like(z)).sum(1);
      write_stats(st, lse_n, c, loss, m.npos, m);
      if (want_grad) G = perpos_grad(lg, m, lse_n, c, at::ones_like(lse_n));
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
    case kMarginAll: {
      const Margin r = margin_terms(S, m, row_params_of(S, row0, spec), spec.p[0]);
      const Tensor zero = at::zeros_like(r.d);
      const Tensor sum_p = at::where(m.pos, r.lp.relu(), zero).sum(1), sum_n = at::where(m.neg, r.ln.relu(), zero).sum(1);
      const Tensor nz_p = (counts_nonzero(r.lp.relu()) * m.pos).sum(1), nz_n = (counts_nonzero(r.ln.relu()) * m.neg).sum(1);
      const Tensor act_p = at::where(m.pos, relu_grad(r.lp), zero).sum(1);
      const Tensor act_n = at::where(m.neg, relu_grad(r.ln), zero).sum(1);
      const Tensor z1 = at::zeros_like(sum_p);
      write_stats(st, at::where(r.any, m.npos * act_n - m.nneg * act_p, z1), Tensor(),
                  at::where(r.any, m.nneg * sum_p + m.npos * sum_n, z1), at::where(r.any, m.nneg * nz_p + m.npos * nz_n, z1),
                  m);
      if (want_grad) G = margin_grad(r, m, at::ones_like(sum_p));
      break;
    }
    case kFastAp: {
      const FastAp r = fastap_hist(S, m, static_cast<int64_t>(spec.p[0]));
      write_stats(st, Tensor(), Tensor(), r.loss, m.npos.gt(0).to(S.scalar_type()), m);
      if (want_grad) G = fastap_grad(r, m, at::ones_like(r.loss), static_cast<int64_t>(spec.p[0]));
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
  shift_to_pair_distances(S, row0, rows, spec);
  const Masks m = make_masks(S, row0, rows, spec);
  const Tensor st = row_stats.narrow(0, row0, S.size(0));
  const Tensor w = row_weights.narrow(0, row0, S.size(0));
  const Tensor w0 = w.select(1, 0);
  const double t = spec.p[0];
  Tensor G;
  switch (spec.loss) {
    case kCircle: case kUnified: case kMultiSimilarity: case kGenLifted: {
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
    case kNTXent: case kTupletMargin: {
      G = perpos_grad(perpos_logits(S, spec), m, st.select(1, kPairAux0), st.select(1, kPairAux1), w0);
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
    case kMarginAll: {
      G = margin_grad(margin_terms(S, m, row_params_of(S, row0, spec), spec.p[0]), m, w0);
      break;
    }
    case kFastAp: {
      const int64_t bins = static_cast<int64_t>(spec.p[0]);
      G = fastap_grad(fastap_hist(S, m, bins), m, w0, bins);
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
