// l1_ball.cuh: block-wide row operations on the l1 ball, shared by
// projection.cu (the exact projection) and prox.cu (SIM's prox), as
// csrc/cpu/l1_ball.inc is on the CPU. One block per row; the math is
// idl_math.h's.
#ifndef IDL_CUDA_L1_BALL_CUH
#define IDL_CUDA_L1_BALL_CUH

#include <math.h>

#include "../idl_math.h"
#include "common.cuh"

namespace idl_cuda {

// |a_j| summed over a row, to every thread of the block, and max |a_j| (NaN
// if an entry is NaN) to *top.
template <typename T>
__device__ double row_l1(int64_t n, const T *a, double *top, double *partial) {
    double sum = 0.0, largest = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const double magnitude = fabs(static_cast<double>(a[j]));
        sum += magnitude;
        largest = nan_max(largest, magnitude);
    }
    *top = block_nan_max(largest, partial);
    return block_sum(sum, partial);
}

// The exact projection's cut of a row; false for a row left as it is
// (idl_l1_row_kept). Every thread of the block gets the same answer.
template <typename T>
__device__ bool row_cut(int64_t n, const T *a, double kappa, idl_l1_cut *cut,
                        double *partial) {
    double top;
    const double l1 = row_l1(n, a, &top, partial);
    if (idl_l1_row_kept(l1, kappa, isfinite(top)))
        return false;
    *cut = idl_l1_cut_start(top, kappa);
    for (;;) {
        double sum = 0.0, count = 0.0;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const double gap = idl_l1_gap(cut->top, cut->unit, static_cast<double>(a[j]));
            if (idl_l1_member(gap, cut->delta) != 0.0) {
                sum += gap;
                count += 1.0;
            }
        }
        sum = block_sum(sum, partial);
        count = block_sum(count, partial);
        if (!idl_l1_step(cut, sum, count))
            return true;
    }
}

// dst[j] = the projection of src[j] through `cut` (from row_cut), for this
// thread's entries; dst may be src.
template <typename T>
__device__ void project_through_cut(int64_t n, const T *src, const idl_l1_cut &cut, T *dst) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const double entry = static_cast<double>(src[j]);
        const double gap = idl_l1_gap(cut.top, cut.unit, entry);
        dst[j] = static_cast<T>(idl_l1_project_entry(entry, gap, cut.delta, cut.per_unit));
    }
}

}  // namespace idl_cuda

#endif  // IDL_CUDA_L1_BALL_CUH
