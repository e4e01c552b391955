// prox_checks.h: argument checks of idl::prox_l1_ball, shared by its CPU glue
// (csrc/sim_ops.cpp) and its CUDA glue (csrc/cuda/ops_cuda.cpp), so that both
// devices reject the same arguments with the same messages.
#ifndef IDL_PROX_CHECKS_H
#define IDL_PROX_CHECKS_H

#include <ATen/ATen.h>

#include <cmath>

namespace idl_checks {

// Everything but the threshold values, which each device reads its own way.
inline void check_prox_args(const at::Tensor& W, const at::Tensor& threshold, double radius,
                            int64_t ball_cols) {
    TORCH_CHECK_VALUE(W.dim() == 2, "idl: W must be a 2-D tensor, got ", W.dim(), "-D");
    TORCH_CHECK_TYPE(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
                     "idl: W must be float32 or float64, got ", W.scalar_type());
    TORCH_CHECK_VALUE(threshold.dim() == 1 && threshold.size(0) == W.size(0),
                      "idl: threshold must be a 1-D tensor with one entry per row of W (",
                      W.size(0), "), got shape ", threshold.sizes());
    TORCH_CHECK_TYPE(threshold.scalar_type() == W.scalar_type(), "idl: threshold has dtype ",
                     threshold.scalar_type(), " but W has ", W.scalar_type());
    TORCH_CHECK_VALUE(threshold.device() == W.device(), "idl: threshold is on ",
                      threshold.device(), " but W is on ", W.device());
    TORCH_CHECK_VALUE(radius >= 0.0, "idl: radius must be >= 0 (inf for no ball), got ",
                      radius);
    TORCH_CHECK_VALUE(ball_cols >= 0 && ball_cols <= W.size(1),
                      "idl: ball_cols must be in [0, ", W.size(1), "] (the columns of W), got ",
                      ball_cols);
}

// Threshold t of row `row` must be finite and >= 0.
inline void check_prox_threshold(double t, int64_t row) {
    TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0.0,
                      "idl: threshold must hold finite numbers >= 0, got ", t, " for row ", row);
}

}  // namespace idl_checks

#endif  // IDL_PROX_CHECKS_H
