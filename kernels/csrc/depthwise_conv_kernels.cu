// The kernels for the four dtypes the op accepts; accumulation is in float (in double for double).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "depthwise_conv_kernels.cuh"

namespace fat_kernels {

#define DWCONV_INSTANTIATE(scalar_t)                                                                        \
  template bool launch_forward<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*,     \
                                         const ConvGeometry&, bool, void*);                                \
  template bool launch_weight_grad<scalar_t>(const scalar_t*, const scalar_t*,                             \
                                             AccumulatorType<scalar_t>::type*, const ConvGeometry&,        \
                                             const WeightGradTiling&, void*);

DWCONV_INSTANTIATE(float)
DWCONV_INSTANTIATE(double)
DWCONV_INSTANTIATE(c10::Half)
DWCONV_INSTANTIATE(c10::BFloat16)

#undef DWCONV_INSTANTIATE

}  // namespace fat_kernels
