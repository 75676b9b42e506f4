// CPU kernels of the layer-imitation loss (structloss_fast::layer_imitation_loss and its
// backward; docs/spec/imitation.md). All layers are cut into fixed spans of kSpan elements and
// one at::parallel_for runs over the spans of every layer at once, so that many small layers
// cost one parallel region instead of one per layer, and a large layer uses every thread.
// The forward reads each pair once and writes nothing but one float64 partial sum per span; the
// partials of a layer are then added in span order, so the result does not depend on the thread
// count. The backward writes the gradients in one pass (both of them when both are needed).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../common/math.h"

namespace structloss_fast {
namespace imitation {
namespace {

constexpr int64_t kSpan = 16384;   // elements per span (a parallel task works on whole spans)
constexpr int64_t kGrain = 131072;  // a parallel task works on at least this many elements

struct Span {
  int64_t layer;
  int64_t begin;
  int64_t end;
};

// sum_j (s_j - t_j)^2 over one span, in float64 (the difference of two floats is exact in
// double, so the only roundings are those of the squares' accumulation).
template <typename scalar_t>
SLF_CPU_MULTIVERSION double sum_sq_diff(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t n) {
  using C = typename Compute<scalar_t>::type;
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const double d = static_cast<double>(static_cast<C>(s[j])) - static_cast<double>(static_cast<C>(t[j]));
    acc += d * d;
  }
  return acc;
}

// gs = coef * (s - t) and / or gt = -coef * (s - t) over one span (nullptr: not wanted).
template <typename scalar_t>
SLF_CPU_MULTIVERSION void grad_span(const scalar_t* __restrict s, const scalar_t* __restrict t,
                                    scalar_t* __restrict gs, scalar_t* __restrict gt,
                                    typename Compute<scalar_t>::type coef, int64_t n) {
  using C = typename Compute<scalar_t>::type;
  if (gs != nullptr && gt != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const C g = coef * (static_cast<C>(s[j]) - static_cast<C>(t[j]));
      gs[j] = static_cast<scalar_t>(g);
      gt[j] = static_cast<scalar_t>(-g);
    }
  } else if (gs != nullptr) {
    for (int64_t j = 0; j < n; ++j) gs[j] = static_cast<scalar_t>(coef * (static_cast<C>(s[j]) - static_cast<C>(t[j])));
  } else if (gt != nullptr) {
    for (int64_t j = 0; j < n; ++j) gt[j] = static_cast<scalar_t>(coef * (static_cast<C>(t[j]) - static_cast<C>(s[j])));
  }
}

// The inputs' common dtype after checking the pairs (the Python entry point validates with
// messages naming the argument; these are the kernel's own invariants).
at::ScalarType check_layers(at::TensorList student, at::TensorList teacher) {
  TORCH_CHECK(!student.empty(), "layer_imitation_loss: needs at least one layer");
  TORCH_CHECK(student.size() == teacher.size(), "layer_imitation_loss: ", student.size(), " student layers but ",
              teacher.size(), " teacher layers");
  const at::ScalarType dtype = student[0].scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "layer_imitation_loss: floating inputs expected, got ", dtype);
  for (size_t i = 0; i < student.size(); ++i) {
    TORCH_CHECK(student[i].sizes() == teacher[i].sizes(), "layer_imitation_loss: layer ", i, ": student shape ",
                student[i].sizes(), " != teacher shape ", teacher[i].sizes());
    TORCH_CHECK(student[i].scalar_type() == dtype && teacher[i].scalar_type() == dtype,
                "layer_imitation_loss: layer ", i, ": every tensor must have dtype ", dtype);
    TORCH_CHECK(student[i].device().is_cpu() && teacher[i].device().is_cpu(), "layer_imitation_loss: layer ", i,
                ": CPU tensors expected");
  }
  return dtype;
}

std::vector<Span> make_spans(at::TensorList student) {
  std::vector<Span> spans;
  for (size_t i = 0; i < student.size(); ++i) {
    const int64_t n = student[i].numel();
    for (int64_t b = 0; b < n; b += kSpan) spans.push_back({static_cast<int64_t>(i), b, std::min(n, b + kSpan)});
  }
  return spans;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

int64_t grain_spans() { return std::max<int64_t>(1, kGrain / kSpan); }

at::Tensor layer_imitation_loss_cpu(at::TensorList student, at::TensorList teacher) {
  const at::ScalarType dtype = check_layers(student, teacher);
  const int64_t L = static_cast<int64_t>(student.size());
  const std::vector<at::Tensor> s = contiguous_all(student);
  const std::vector<at::Tensor> t = contiguous_all(teacher);
  const std::vector<Span> spans = make_spans(student);
  std::vector<double> partial(spans.size(), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "structloss_fast_layer_imitation_loss_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(spans.size()), grain_spans(), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const Span& sp = spans[k];
        const scalar_t* sp_s = s[sp.layer].const_data_ptr<scalar_t>() + sp.begin;
        const scalar_t* sp_t = t[sp.layer].const_data_ptr<scalar_t>() + sp.begin;
        partial[k] = sum_sq_diff<scalar_t>(sp_s, sp_t, sp.end - sp.begin);
      }
    });
  });

  // Per layer, the spans' partial sums in a fixed order: deterministic for any thread count.
  at::Tensor sums = at::zeros({L}, at::TensorOptions().dtype(at::kDouble));
  double* sums_p = sums.data_ptr<double>();
  for (size_t k = 0; k < spans.size(); ++k) sums_p[spans[k].layer] += partial[k];
  return sums.to(student[0].device());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> layer_imitation_loss_backward_cpu(
    at::TensorList student, at::TensorList teacher, const at::Tensor& coef, std::array<bool, 2> grad_mask) {
  const at::ScalarType dtype = check_layers(student, teacher);
  const int64_t L = static_cast<int64_t>(student.size());
  TORCH_CHECK(coef.dim() == 1 && coef.numel() == L && coef.device().is_cpu(),
              "layer_imitation_loss_backward: coef must be a CPU tensor of shape (", L, ",), got ", coef.sizes());
  std::vector<at::Tensor> gs, gt;
  for (int64_t i = 0; i < L; ++i) {
    const auto options = student[i].options();
    gs.push_back(grad_mask[0] ? at::empty(student[i].sizes(), options) : at::empty({0}, options));
    gt.push_back(grad_mask[1] ? at::empty(student[i].sizes(), options) : at::empty({0}, options));
  }
  if (!grad_mask[0] && !grad_mask[1]) return {gs, gt};
  const at::Tensor coef64 = coef.to(at::kDouble).contiguous();
  const double* c = coef64.const_data_ptr<double>();
  const std::vector<at::Tensor> s = contiguous_all(student);
  const std::vector<at::Tensor> t = contiguous_all(teacher);
  const std::vector<Span> spans = make_spans(student);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "structloss_fast_layer_imitation_backward_cpu", [&] {
    using C = typename Compute<scalar_t>::type;
    at::parallel_for(0, static_cast<int64_t>(spans.size()), grain_spans(), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const Span& sp = spans[k];
        const int64_t i = sp.layer;
        scalar_t* out_s = grad_mask[0] ? gs[i].data_ptr<scalar_t>() + sp.begin : nullptr;
        scalar_t* out_t = grad_mask[1] ? gt[i].data_ptr<scalar_t>() + sp.begin : nullptr;
        grad_span<scalar_t>(s[i].const_data_ptr<scalar_t>() + sp.begin, t[i].const_data_ptr<scalar_t>() + sp.begin,
                            out_s, out_t, static_cast<C>(c[i]), sp.end - sp.begin);
      }
    });
  });
  return {gs, gt};
}

}  // namespace
}  // namespace imitation

TORCH_LIBRARY_IMPL(structloss_fast, CPU, m) {
  m.impl("layer_imitation_loss", &imitation::layer_imitation_loss_cpu);
  m.impl("layer_imitation_loss_backward", &imitation::layer_imitation_loss_backward_cpu);
}

}  // namespace structloss_fast
