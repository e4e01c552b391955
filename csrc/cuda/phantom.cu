// phantom.cu: the phantom adjoint on the device, idl.h's idl_phantom_adjoint
// (csrc/cpu/fixed_point.inc): from v = 0, `steps` damped adjoint steps
//     v <- (1 - tau) v + tau φ'(z) ⊙ (v A + g),
// the first of them without a product; steps = 1, tau = 1 is JFB. The CPU
// stops once a step's change max |Δv| is not finite. Here the host never
// waits for that: after each step one thread records it (iterations, the
// change as the residual) and raises a device flag on a non-finite change,
// and every later step kernel reads the flag and does nothing. The stats
// come out as the CPU's: [steps taken, last change, 3 ("steps", no test)].
#include <math.h>

#include "../idl_math.h"
#include "common.cuh"
#include "idl_cuda.h"

namespace idl_cuda {
namespace {

constexpr int kThreads = 256;

// The running state, in the workspace after φ'(z) and the product buffer.
struct PhantomState {
    double change;         // max |Δv| of the step under way (NaN-sticky, see note_change)
    double residual;       // the change of the last step taken
    long long iterations;  // steps taken
    int stopped;           // a step's change was not finite: no later step runs
};

// This block's largest |Δv| into the step's change. As bit patterns, doubles
// >= 0 order like their values, +Inf above them and fabs's NaN above +Inf: an
// integer atomicMax keeps NaN over Inf over any finite change, as the CPU's
// NaN-sticky max does.
__device__ void note_change(double worst, PhantomState *s, double *partial) {
    worst = block_nan_max(worst, partial);
    if (threadIdx.x == 0)
        atomicMax(reinterpret_cast<unsigned long long *>(&s->change),
                  static_cast<unsigned long long>(__double_as_longlong(worst)));
}

// d = φ'(z); v = tau d ⊙ g (the first step, from v = 0).
template <typename T>
__global__ void first_step_kernel(int64_t count, idl_act act, T tau, const T *z, const T *g,
                                  T *d, T *v, PhantomState *s) {
    __shared__ double partial[kWarp];
    double worst = 0.0;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const T di = idl_dphi_at(act, z[i]);
        const T vi = tau * di * g[i];
        d[i] = di;
        v[i] = vi;
        worst = nan_max(worst, fabs(static_cast<double>(vi)));
    }
    note_change(worst, s, partial);
}

// v = keep v + tau d ⊙ (p + g), p = v A from the caller's GEMM.
template <typename T>
__global__ void step_kernel(int64_t count, T keep, T tau, const T *d, const T *p, const T *g,
                            T *v, PhantomState *s) {
    __shared__ double partial[kWarp];
    if (s->stopped)  // the same for every thread: set before this kernel began
        return;
    double worst = 0.0;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const T next = keep * v[i] + tau * d[i] * (p[i] + g[i]);
        worst = nan_max(worst, fabs(static_cast<double>(next - v[i])));
        v[i] = next;
    }
    note_change(worst, s, partial);
}

// One thread, after each step: count it and keep its change, or do nothing
// once stopped.
__global__ void finish_step_kernel(PhantomState *s) {
    if (s->stopped)
        return;
    ++s->iterations;
    s->residual = s->change;
    s->change = 0.0;
    if (!isfinite(s->residual))
        s->stopped = 1;
}

// [iterations, residual, 3]: 3 is the stats' code of a fixed number of steps
// (csrc/ops.cpp's stats_tensor).
__global__ void stats_kernel(const PhantomState *s, double *stats) {
    stats[0] = s == nullptr ? 0.0 : static_cast<double>(s->iterations);
    stats[1] = s == nullptr ? 0.0 : s->residual;
    stats[2] = 3.0;
}

template <typename T>
cudaError_t phantom(int64_t m, int64_t n, idl_matmul matmul_a, const T *z, const T *g,
                    idl_act act, int64_t steps, double tau, T *v, double *stats,
                    void *workspace, cudaStream_t stream) {
    const int64_t count = m * n;
    if (count == 0) {  // nothing to do, and no buffer to touch
        stats_kernel<<<1, 1, 0, stream>>>(nullptr, stats);
        return cudaGetLastError();
    }
    T *d = static_cast<T *>(workspace);
    T *p = d + count;
    auto *s = reinterpret_cast<PhantomState *>(static_cast<char *>(workspace) +
                                               aligned(2 * count * sizeof(T)));
    IDL_TRY(cudaMemsetAsync(s, 0, sizeof(PhantomState), stream));
    const unsigned blocks = blocks_for(count, kThreads);
    const T t = static_cast<T>(tau), keep = static_cast<T>(1.0 - tau);
    first_step_kernel<T><<<blocks, kThreads, 0, stream>>>(count, act, t, z, g, d, v, s);
    finish_step_kernel<<<1, 1, 0, stream>>>(s);
    IDL_TRY(cudaGetLastError());
    for (int64_t k = 1; k < steps; ++k) {
        if (matmul_a.matmul(matmul_a.ctx, m, v, p) != 0)
            return IDL_CUDA_MATMUL_FAILED;
        step_kernel<T><<<blocks, kThreads, 0, stream>>>(count, keep, t, d, p, g, v, s);
        finish_step_kernel<<<1, 1, 0, stream>>>(s);
        IDL_TRY(cudaGetLastError());
    }
    stats_kernel<<<1, 1, 0, stream>>>(s, stats);
    return cudaGetLastError();
}

}  // namespace
}  // namespace idl_cuda

extern "C" {

int64_t idl_cuda_phantom_workspace_bytes(int64_t m, int64_t n, int64_t elem_size) {
    return idl_cuda::aligned(2 * m * n * elem_size) +
           static_cast<int64_t>(sizeof(idl_cuda::PhantomState));
}

cudaError_t idl_cuda_phantom_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a,
                                         const float *z, const float *g, idl_act act,
                                         int64_t steps, double tau, float *v, double *stats,
                                         void *workspace, cudaStream_t stream) {
    return idl_cuda::phantom(m, n, matmul_a, z, g, act, steps, tau, v, stats, workspace, stream);
}

cudaError_t idl_cuda_phantom_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a,
                                         const double *z, const double *g, idl_act act,
                                         int64_t steps, double tau, double *v, double *stats,
                                         void *workspace, cudaStream_t stream) {
    return idl_cuda::phantom(m, n, matmul_a, z, g, act, steps, tau, v, stats, workspace, stream);
}

}  // extern "C"
