// prox.cu: SIM's row-wise prox (idl_prox_l1_ball_* of idl.h) on the device,
// one block per row (a grid-stride loop over rows): every entry
// soft-thresholded by the row's threshold, then the first `ball_cols` entries
// projected onto the l1 ball of `radius` as projection.cu's exact mode does
// (l1_ball.cuh). The same math as csrc/cpu/prox.inc, from idl_math.h, and the
// same NaN rule: a row holding NaN or Inf comes out all NaN.
#include <math.h>

#include "../idl_math.h"
#include "common.cuh"
#include "idl_cuda.h"
#include "l1_ball.cuh"

namespace idl_cuda {
namespace {

constexpr int kRowThreads = 256;

template <typename T>
__global__ void prox_kernel(int64_t rows, int64_t cols, const T *w, int64_t ldw,
                            const T *threshold, int64_t threshold_stride, double radius,
                            int64_t ball_cols, T *out) {
    __shared__ double partial[kWarp];
    for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
        const T *row = w + i * ldw;
        T *dst = out + i * cols;
        const double t = static_cast<double>(threshold[i * threshold_stride]);
        // w - w is 0, or NaN for NaN and Inf: one sum finds either (prox.inc)
        double nonfinite = 0.0;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
            const double entry = static_cast<double>(row[j]);
            nonfinite += entry - entry;
            dst[j] = static_cast<T>(idl_soft_threshold(entry, t));
        }
        if (!(block_sum(nonfinite, partial) == 0.0)) {
            for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
                dst[j] = static_cast<T>(NAN);
            continue;
        }
        // Each thread reads back only the entries it wrote (same j stride).
        idl_l1_cut cut;
        if (ball_cols == 0 || !row_cut(ball_cols, dst, radius, &cut, partial))
            continue;
        project_through_cut(ball_cols, dst, cut, dst);
    }
}

template <typename T>
cudaError_t prox(int64_t rows, int64_t cols, const T *w, int64_t ldw, const T *threshold,
                 int64_t threshold_stride, double radius, int64_t ball_cols, T *out,
                 cudaStream_t stream) {
    if (rows == 0 || cols == 0)
        return cudaSuccess;
    prox_kernel<T><<<blocks_for(rows, 1), kRowThreads, 0, stream>>>(
        rows, cols, w, ldw, threshold, threshold_stride, radius, ball_cols, out);
    return cudaGetLastError();
}

}  // namespace
}  // namespace idl_cuda

extern "C" {

cudaError_t idl_cuda_prox_l1_ball_f32(int64_t rows, int64_t cols, const float *w, int64_t ldw,
                                      const float *threshold, int64_t threshold_stride,
                                      double radius, int64_t ball_cols, float *out,
                                      cudaStream_t stream) {
    return idl_cuda::prox(rows, cols, w, ldw, threshold, threshold_stride, radius, ball_cols,
                          out, stream);
}

cudaError_t idl_cuda_prox_l1_ball_f64(int64_t rows, int64_t cols, const double *w, int64_t ldw,
                                      const double *threshold, int64_t threshold_stride,
                                      double radius, int64_t ball_cols, double *out,
                                      cudaStream_t stream) {
    return idl_cuda::prox(rows, cols, w, ldw, threshold, threshold_stride, radius, ball_cols,
                          out, stream);
}

}  // extern "C"
