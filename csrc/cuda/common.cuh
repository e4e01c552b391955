// common.cuh: small device helpers shared by the CUDA kernels: reductions
// that treat NaN the way the C kernels do, and launch arithmetic.
#ifndef IDL_CUDA_COMMON_CUH
#define IDL_CUDA_COMMON_CUH

#include <stdint.h>

#include <cuda_runtime.h>

namespace idl_cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks of `count` work items, `per_block` items each. Grids stay below
// 2^31 blocks for any size a tensor can have here (rows of a matrix).
inline unsigned blocks_for(int64_t count, int64_t per_block) {
    return static_cast<unsigned>((count + per_block - 1) / per_block);
}

// The larger of a and b, NaN if either is NaN: a NaN residual must win every
// comparison so that a solve notices it (same rule as IDL_ROW_PASS in C).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
    return (b > a || b != b) ? b : a;
}

// Every lane of the warp gets the nan_max of the 32 values.
template <typename T>
__device__ __forceinline__ T warp_nan_max(T v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
        v = nan_max(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

// Every lane of the warp gets the sum of the 32 values (fixed order).
__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple
// of 32 (at most 1024); `partial` is __shared__ room for 32 doubles. Safe to
// call repeatedly with the same `partial`.
__device__ __forceinline__ double block_sum(double v, double *partial) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0)
        partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? partial[lane] : 0.0);
}

// atomicMax for doubles known to be >= 0 and finite, whose bit patterns
// order like the values.
__device__ __forceinline__ void atomic_max_nonneg(double *address, double value) {
    atomicMax(reinterpret_cast<unsigned long long *>(address),
              static_cast<unsigned long long>(__double_as_longlong(value)));
}

}  // namespace idl_cuda

#endif  // IDL_CUDA_COMMON_CUH
