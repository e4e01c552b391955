// sim_ops.cpp: the idl:: op behind SIM's batched solvers, the row-wise prox of
// l1 plus an l1-ball constraint. Schema, tensor checks, and dispatch of row
// blocks to the C kernel of csrc/cpu/prox.c (declared in idl.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "idl.h"

namespace {

template <typename T>
struct ProxKernel;

template <>
struct ProxKernel<float> {
    static constexpr auto run = idl_prox_l1_ball_f32;
};

template <>
struct ProxKernel<double> {
    static constexpr auto run = idl_prox_l1_ball_f64;
};

// Rows per task: enough work per thread to pay for the fork.
constexpr int64_t kMinValuesPerTask = 1 << 14;

at::Tensor prox_l1_ball_cpu(const at::Tensor& W, const at::Tensor& threshold, double radius,
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
    auto w = W.stride(1) == 1 ? W : W.contiguous();
    auto out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t rows = w.size(0), cols = w.size(1);
    const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / std::max<int64_t>(cols, 1));
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "idl::prox_l1_ball", [&] {
        // A broadcast (stride 0) threshold stays one value for all rows.
        const scalar_t* thresholds = threshold.const_data_ptr<scalar_t>();
        const int64_t threshold_stride = threshold.stride(0);
        for (int64_t i = 0; i < rows; ++i) {
            const double t = static_cast<double>(thresholds[i * threshold_stride]);
            TORCH_CHECK_VALUE(std::isfinite(t) && t >= 0.0,
                              "idl: threshold must hold finite numbers >= 0, got ", t,
                              " for row ", i);
            if (threshold_stride == 0) break;
        }
        const scalar_t* src = w.const_data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        const int64_t ldw = w.stride(0);
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
            ProxKernel<scalar_t>::run(end - begin, cols, src + begin * ldw, ldw,
                                      thresholds + begin * threshold_stride, threshold_stride,
                                      radius, ball_cols, dst + begin * cols);
        });
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idl, m) {
    m.def("prox_l1_ball(Tensor W, Tensor threshold, float radius, int ball_cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(idl, CPU, m) {
    m.impl("prox_l1_ball", &prox_l1_ball_cpu);
}
