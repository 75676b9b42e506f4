// Host-side checks of the fused SGLD step's own invariants, shared by the CPU and CUDA kernels.
// The Python entry point (structloss_fast/sgld.py) validates user input first, with messages
// that name the argument; these checks guard direct calls of torch.ops.structloss_fast.sgld_step_.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace structloss_fast {
namespace sgld {

void check_sgld_inputs(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                       at::ArrayRef<double> grad_clamp, at::ArrayRef<double> x_clamp, at::ArrayRef<int64_t> philox,
                       at::DeviceType device);

}  // namespace sgld
}  // namespace structloss_fast
