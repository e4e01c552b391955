// common.cuh: small device helpers shared by the CUDA kernels: reductions
// that treat NaN the way the C kernels do, and launch arithmetic.
#ifndef IDL_CUDA_COMMON_CUH
#define IDL_CUDA_COMMON_CUH

#include <stdint.h>

#include <cuda_runtime.h>

namespace idl_cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The largest grid a launch may have (gridDim.x <= 2^31 - 1).
constexpr int64_t kMaxBlocks = 2147483647;

// Blocks of `count` work items, `per_block` items each, capped at kMaxBlocks:
// every kernel launched with it loops over its items with a grid stride, so a
// tall matrix is covered rather than wrapping the grid size.
inline unsigned blocks_for(int64_t count, int64_t per_block) {
    const int64_t wanted = (count + per_block - 1) / per_block;
    return static_cast<unsigned>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
}

// Bytes rounded up to 256: the alignment of each part of a workspace.
inline int64_t aligned(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Return a failed CUDA call's error from the host function that made it.
#define IDL_TRY(call)                          \
    do {                                       \
        const cudaError_t idl_err_ = (call);   \
        if (idl_err_ != cudaSuccess)           \
            return idl_err_;                   \
    } while (0)

// The larger of a and b, NaN if either is NaN: a NaN residual must win every
// comparison so that a solve notices it (same rule as IDL_ROW_PASS in C).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
    return (b > a || b != b) ? b : a;
}

struct Sum {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct NanMax {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return nan_max(a, b); }
};

// Every lane of the warp gets op over the 32 values. The butterfly pairs
// lanes that combine the same two values (op commutes), so every lane gets
// the same bits.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
        v = op(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_nan_max(T v) {
    return warp_reduce(v, NanMax{});
}

// op over the block, the same bits to every thread (so that loops ending on
// it end together); `identity` is op's neutral value. blockDim.x must be a
// multiple of 32 (at most 1024); `partial` is __shared__ room for 32 doubles.
// Safe to call repeatedly with the same `partial`.
template <typename Op>
__device__ __forceinline__ double block_reduce(double v, double *partial, double identity, Op op) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    v = warp_reduce(v, op);
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0)
        partial[warp] = v;
    __syncthreads();
    return warp_reduce(lane < warps ? partial[lane] : identity, op);
}

__device__ __forceinline__ double block_sum(double v, double *partial) {
    return block_reduce(v, partial, 0.0, Sum{});
}

// For values >= 0 (or NaN).
__device__ __forceinline__ double block_nan_max(double v, double *partial) {
    return block_reduce(v, partial, 0.0, NanMax{});
}

// atomicMax for doubles known to be >= 0 and finite, whose bit patterns
// order like the values.
__device__ __forceinline__ void atomic_max_nonneg(double *address, double value) {
    atomicMax(reinterpret_cast<unsigned long long *>(address),
              static_cast<unsigned long long>(__double_as_longlong(value)));
}

}  // namespace idl_cuda

#endif  // IDL_CUDA_COMMON_CUH
