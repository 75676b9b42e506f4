#include "jem_common.h"

#include <ATen/MemoryOverlap.h>

namespace structloss_fast {
namespace sgld {

void check_sgld_inputs(const at::Tensor& x, const at::Tensor& grad, const std::optional<at::Tensor>& noise,
                       at::ArrayRef<double> grad_clamp, at::ArrayRef<double> x_clamp, at::ArrayRef<int64_t> philox,
                       at::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, "sgld_step_: x is on ", x.device(), ", this kernel runs ",
              c10::DeviceTypeName(device), " tensors");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sgld_step_: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "sgld_step_: grad must have the shape of x ", x.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "sgld_step_: grad must have the dtype of x (", x.scalar_type(),
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "sgld_step_: grad must be on the device of x");
  if (noise.has_value() && noise->defined()) {
    TORCH_CHECK(noise->sizes() == x.sizes(), "sgld_step_: noise must have the shape of x ", x.sizes(), ", got ",
                noise->sizes());
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), "sgld_step_: noise must have the dtype of x");
    TORCH_CHECK(noise->device() == x.device(), "sgld_step_: noise must be on the device of x");
    at::assert_no_partial_overlap(x, *noise);
  }
  TORCH_CHECK(grad_clamp.empty() || (grad_clamp.size() == 2 && !(grad_clamp[0] > grad_clamp[1])),
              "sgld_step_: grad_clamp must be [] or [lo, hi] with lo <= hi");
  TORCH_CHECK(x_clamp.empty() || (x_clamp.size() == 2 && !(x_clamp[0] > x_clamp[1])),
              "sgld_step_: x_clamp must be [] or [lo, hi] with lo <= hi");
  TORCH_CHECK(philox.empty() || philox.size() == 2, "sgld_step_: philox must be [] or [seed, counter]");
  at::assert_no_internal_overlap(x);
  at::assert_no_partial_overlap(x, grad);
}

}  // namespace sgld
}  // namespace structloss_fast
