// sim_ops.cpp: the idl:: op behind SIM's batched solvers, the row-wise prox of
// l1 plus an l1-ball constraint. Schema, tensor checks (prox_checks.h, shared
// with the CUDA glue in csrc/cuda/ops_cuda.cpp), and dispatch of row blocks to
// the C kernel of csrc/cpu/prox.c (declared in idl.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include "idl.h"
#include "prox_checks.h"

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
    idl_checks::check_prox_args(W, threshold, radius, ball_cols);
    auto w = W.stride(1) == 1 ? W : W.contiguous();
    auto out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t rows = w.size(0), cols = w.size(1);
    const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / std::max<int64_t>(cols, 1));
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "idl::prox_l1_ball", [&] {
        // A broadcast (stride 0) threshold stays one value for all rows.
        const scalar_t* thresholds = threshold.const_data_ptr<scalar_t>();
        const int64_t threshold_stride = threshold.stride(0);
        for (int64_t i = 0; i < rows; ++i) {
            idl_checks::check_prox_threshold(static_cast<double>(thresholds[i * threshold_stride]), i);
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
