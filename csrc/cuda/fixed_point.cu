// fixed_point.cu: the forward and adjoint fixed-point solves on the device,
// with the built-in activations. The algorithm of csrc/cpu/fixed_point.inc:
// x <- step(x M) row by row, M a fixed n x n matrix applied by the caller's
// GEMM, a sample leaving the working set once its residual is <= tol.
//
// What differs is who decides. The per-row decisions are taken on the device:
// the step kernel (one warp per working row) computes the new row, its
// residual, and, when the row is done, writes it to the output and freezes it
// (later passes skip it). NaN or Inf raises a device flag that stops every row
// from the next pass on. The host only reads a few counters every
// `check_every` iterations; then it stops the loop, or packs the rows still
// moving to the front of the working set (a stable compaction) so the GEMM of
// the next passes covers only them. Nothing is synchronised inside the other
// iterations. Finally the stats are computed on the device too.
#include <math.h>

#include "../idl_math.h"
#include "common.cuh"
#include "idl_cuda.h"

namespace idl_cuda {
namespace {

constexpr int kStepThreads = 256;                    // 8 warps,
constexpr int kRowsPerBlock = kStepThreads / kWarp;  // one row each
constexpr int kScanThreads = 1024;

// The elementwise update of each solve: the new value of entry `at` (sample *
// n + j) of a sample's row, from the GEMM output p.
template <typename T>
struct ForwardUpdate {  // x = φ(z), z = p + c0, and z is an output
    idl_act act;
    const T *c0;
    T *z;
    __device__ __forceinline__ T operator()(int64_t at, T p) const {
        const T zj = p + c0[at];
        z[at] = zj;
        return idl_phi_at(act, zj);
    }
};

template <typename T>
struct AdjointUpdate {  // v = φ'(z) ⊙ (p + g)
    idl_act act;
    const T *z;
    const T *g;
    __device__ __forceinline__ T operator()(int64_t at, T p) const {
        return idl_dphi_at(act, z[at]) * (p + g[at]);
    }
};

// ---- solver state -------------------------------------------------------------

// The counters the host reads at a check, and the stats' raw material.
struct Progress {
    unsigned long long retired;   // samples finished so far
    double finished_worst;        // largest residual of a finished sample
    long long last_retire_iter;   // iteration in which the last one finished
    long long nonfinite_iter;     // first iteration with a NaN/Inf residual, 0: none
    int nonfinite;                // 1: an Inf residual was seen, 2: a NaN one
};

// The working set, rows 0..active-1: iterates, GEMM output, the sample of each
// row, whether the row is finished, and its latest residual. `spare_idx` and
// `src` serve the compaction.
template <typename T>
struct Workset {
    T *xw;
    T *p;
    long long *idx;
    long long *spare_idx;
    long long *src;
    double *residual;
    int *frozen;
    Progress *progress;
};

// Byte offsets of the workspace's parts, each 256-byte aligned.
struct Layout {
    int64_t xw, p, idx, spare_idx, src, residual, frozen, progress, total;
};

int64_t aligned(int64_t bytes) { return (bytes + 255) / 256 * 256; }

Layout layout(int64_t m, int64_t n, int64_t elem_size) {
    Layout l;
    int64_t at = 0;
    auto take = [&at](int64_t bytes) {
        const int64_t here = at;
        at += aligned(bytes);
        return here;
    };
    l.xw = take(m * n * elem_size);
    l.p = take(m * n * elem_size);
    l.idx = take(m * static_cast<int64_t>(sizeof(long long)));
    l.spare_idx = take(m * static_cast<int64_t>(sizeof(long long)));
    l.src = take(m * static_cast<int64_t>(sizeof(long long)));
    l.residual = take(m * static_cast<int64_t>(sizeof(double)));
    l.frozen = take(m * static_cast<int64_t>(sizeof(int)));
    l.progress = take(sizeof(Progress));
    l.total = at;
    return l;
}

template <typename T>
Workset<T> workset(int64_t m, int64_t n, void *workspace) {
    const Layout l = layout(m, n, sizeof(T));
    char *base = static_cast<char *>(workspace);
    return {reinterpret_cast<T *>(base + l.xw),
            reinterpret_cast<T *>(base + l.p),
            reinterpret_cast<long long *>(base + l.idx),
            reinterpret_cast<long long *>(base + l.spare_idx),
            reinterpret_cast<long long *>(base + l.src),
            reinterpret_cast<double *>(base + l.residual),
            reinterpret_cast<int *>(base + l.frozen),
            reinterpret_cast<Progress *>(base + l.progress)};
}

// ---- kernels ------------------------------------------------------------------

__global__ void iota_kernel(int64_t count, long long *idx) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        idx[i] = i;
}

// The working rows of a warp-per-row kernel: this warp's first, and the
// stride of the grid-stride loop over rows.
__device__ __forceinline__ int64_t first_row() {
    return blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t row_stride() {
    return static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
}

// One pass over the working rows, one warp per row: x <- update(p), residual
// max |Δx| (NaN sticky); a row with residual <= tol is copied to its sample's
// row of `out` and frozen. A row that stopped being finite raises the flag,
// and from the next pass on every row stands still.
template <typename T, typename Update>
__global__ void step_kernel(int64_t active, int64_t n, long long iteration, double tol,
                            Update update, Workset<T> w, T *out) {
    const long long stopped_at = w.progress->nonfinite_iter;
    if (stopped_at != 0 && stopped_at < iteration)
        return;
    const int lane = threadIdx.x % kWarp;
    for (int64_t r = first_row(); r < active; r += row_stride()) {
        if (w.frozen[r])
            continue;  // the whole warp: r and frozen[r] are the same for its lanes
        const int64_t sample = w.idx[r];
        T *x = w.xw + r * n;
        const T *p = w.p + r * n;
        T worst = T(0);
        for (int64_t j = lane; j < n; j += kWarp) {
            const T xj = update(sample * n + j, p[j]);
            worst = nan_max(worst, static_cast<T>(fabs(xj - x[j])));
            x[j] = xj;
        }
        worst = warp_nan_max(worst);  // the same in every lane
        const double residual = static_cast<double>(worst);
        if (residual <= tol) {
            T *dst = out + sample * n;
            for (int64_t j = lane; j < n; j += kWarp)
                dst[j] = x[j];  // this lane's own writes above
            if (lane == 0) {
                w.frozen[r] = 1;
                atomicAdd(&w.progress->retired, 1ull);
                atomic_max_nonneg(&w.progress->finished_worst, residual);
                atomicMax(&w.progress->last_retire_iter, iteration);
            }
        } else if (lane == 0) {
            w.residual[r] = residual;
            if (!isfinite(residual)) {
                atomicMax(&w.progress->nonfinite, isnan(residual) ? 2 : 1);
                atomicCAS(reinterpret_cast<unsigned long long *>(&w.progress->nonfinite_iter),
                          0ull, static_cast<unsigned long long>(iteration));
            }
        }
    }
}

// One block: src[k] = the k-th working row (in order) that is not frozen.
// Each thread scans a contiguous chunk; a block-wide exclusive scan of the
// chunk counts gives each chunk its first slot.
__global__ void pack_scan_kernel(int64_t active, const int *frozen, long long *src) {
    __shared__ long long offsets[kScanThreads];
    const int64_t chunk = (active + blockDim.x - 1) / blockDim.x;
    const int64_t begin = threadIdx.x * chunk;
    const int64_t end = begin + chunk < active ? begin + chunk : active;
    long long moving = 0;
    for (int64_t r = begin; r < end; ++r)
        moving += frozen[r] ? 0 : 1;
    offsets[threadIdx.x] = moving;
    __syncthreads();
    for (int stride = 1; stride < blockDim.x; stride *= 2) {  // inclusive scan
        const long long add = threadIdx.x >= stride ? offsets[threadIdx.x - stride] : 0;
        __syncthreads();
        offsets[threadIdx.x] += add;
        __syncthreads();
    }
    long long slot = offsets[threadIdx.x] - moving;
    for (int64_t r = begin; r < end; ++r)
        if (!frozen[r])
            src[slot++] = r;
}

// Row k of the packed set, from working row src[k]: iterate into `to_x`,
// sample index into `to_idx`, and not frozen.
template <typename T>
__global__ void pack_gather_kernel(int64_t kept, int64_t n, const long long *src,
                                   const T *from_x, const long long *from_idx, T *to_x,
                                   long long *to_idx, int *frozen) {
    const int lane = threadIdx.x % kWarp;
    for (int64_t k = first_row(); k < kept; k += row_stride()) {
        const int64_t r = src[k];
        for (int64_t j = lane; j < n; j += kWarp)
            to_x[k * n + j] = from_x[r * n + j];
        if (lane == 0) {
            to_idx[k] = from_idx[r];
            frozen[k] = 0;
        }
    }
}

// Rows never finished go to their sample's row of out as they stand.
template <typename T>
__global__ void retire_rest_kernel(int64_t active, int64_t n, Workset<T> w, T *out) {
    const int lane = threadIdx.x % kWarp;
    for (int64_t r = first_row(); r < active; r += row_stride()) {
        if (w.frozen[r])
            continue;
        const T *x = w.xw + r * n;
        T *dst = out + w.idx[r] * n;
        for (int64_t j = lane; j < n; j += kWarp)
            dst[j] = x[j];
    }
}

// One block: stats = [iterations, residual, converged] as the C solver reports
// them. `passes` is the number of passes the host ran.
__global__ void stats_kernel(int64_t m, int64_t active, long long passes, const int *frozen,
                             const double *residual, const Progress *progress, double *stats) {
    __shared__ double worsts[kScanThreads];
    double worst = 0.0;  // largest final residual of the unfinished rows
    for (int64_t r = threadIdx.x; r < active; r += blockDim.x)
        if (!frozen[r])
            worst = nan_max(worst, residual[r]);
    worsts[threadIdx.x] = worst;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride)
            worsts[threadIdx.x] = nan_max(worsts[threadIdx.x], worsts[threadIdx.x + stride]);
        __syncthreads();
    }
    if (threadIdx.x != 0)
        return;
    const Progress s = *progress;
    if (s.nonfinite != 0) {  // the news is the non-finite residual
        stats[0] = static_cast<double>(s.nonfinite_iter);
        stats[1] = s.nonfinite == 2 ? nan("") : INFINITY;
        stats[2] = 0.0;
        return;
    }
    const bool converged = s.retired == static_cast<unsigned long long>(m);
    stats[0] = static_cast<double>(converged ? s.last_retire_iter : passes);
    stats[1] = fmax(s.finished_worst, worsts[0]);
    stats[2] = converged ? 1.0 : 0.0;
}

// The stats of a solve with nothing to solve (m or n is 0), as the C solver
// reports them: no iteration, converged.
__global__ void nothing_to_solve_kernel(double *stats) {
    stats[0] = 0.0;
    stats[1] = 0.0;
    stats[2] = 1.0;
}

// ---- the host loop ---------------------------------------------------------------

#define IDL_TRY(call)                          \
    do {                                       \
        const cudaError_t idl_err_ = (call);   \
        if (idl_err_ != cudaSuccess)           \
            return idl_err_;                   \
    } while (0)

// Pack the `kept` unfinished rows of the first `active` working rows to the
// front. The packed iterates go to the GEMM output buffer, free until the
// next GEMM, and the two buffers trade places.
template <typename T>
cudaError_t pack(Workset<T> &w, int64_t active, int64_t kept, int64_t n, cudaStream_t stream) {
    pack_scan_kernel<<<1, kScanThreads, 0, stream>>>(active, w.frozen, w.src);
    pack_gather_kernel<T><<<blocks_for(kept, kRowsPerBlock), kStepThreads, 0, stream>>>(
        kept, n, w.src, w.xw, w.idx, w.p, w.spare_idx, w.frozen);
    IDL_TRY(cudaGetLastError());
    T *x = w.xw;
    w.xw = w.p;
    w.p = x;
    long long *idx = w.idx;
    w.idx = w.spare_idx;
    w.spare_idx = idx;
    return cudaSuccess;
}

// The shared loop of both solves, on m samples whose first iterate is in w.xw.
// When that iterate is all zeros (`zero_start`), its product is too and the
// first GEMM is skipped, as in C (an A holding NaN or Inf then shows from the
// second product on, at the same iteration as on the CPU).
template <typename T, typename Update>
cudaError_t iterate(int64_t m, int64_t n, idl_matmul mm, Update update, idl_solver solver,
                    int64_t check_every, bool zero_start, Workset<T> w, T *out,
                    double *stats, cudaStream_t stream) {
    if (check_every < 1)
        return cudaErrorInvalidValue;
    if (m == 0 || n == 0) {  // nothing to solve, and no buffer to touch
        nothing_to_solve_kernel<<<1, 1, 0, stream>>>(stats);
        return cudaGetLastError();
    }
    IDL_TRY(cudaMemsetAsync(w.frozen, 0, m * sizeof(int), stream));
    IDL_TRY(cudaMemsetAsync(w.progress, 0, sizeof(Progress), stream));
    // read by stats_kernel for every unfinished row, even after no pass
    IDL_TRY(cudaMemsetAsync(w.residual, 0, m * sizeof(double), stream));
    iota_kernel<<<blocks_for(m < 65536 * 256 ? m : 65536 * 256, 256), 256, 0, stream>>>(m, w.idx);
    int64_t active = m;  // working rows, finished ones included until packed
    long long passes = 0;
    while (active > 0 && passes < solver.max_iter) {
        if (passes == 0 && zero_start)
            IDL_TRY(cudaMemsetAsync(w.p, 0, static_cast<size_t>(active * n) * sizeof(T), stream));
        else if (mm.matmul(mm.ctx, active, w.xw, w.p) != 0)
            return IDL_CUDA_MATMUL_FAILED;
        ++passes;
        step_kernel<T, Update><<<blocks_for(active, kRowsPerBlock), kStepThreads, 0, stream>>>(
            active, n, passes, solver.tol, update, w, out);
        IDL_TRY(cudaGetLastError());
        if (passes % check_every != 0)
            continue;
        Progress seen;
        IDL_TRY(cudaMemcpyAsync(&seen, w.progress, sizeof(Progress), cudaMemcpyDeviceToHost,
                                stream));
        IDL_TRY(cudaStreamSynchronize(stream));
        if (seen.nonfinite != 0)
            break;
        const int64_t kept = m - static_cast<int64_t>(seen.retired);
        if (kept == 0) {
            active = 0;
            break;
        }
        // Packed rows must run another pass: their residuals are not moved.
        if (kept < active && passes < solver.max_iter) {
            IDL_TRY(pack(w, active, kept, n, stream));
            active = kept;
        }
    }
    if (active > 0)
        retire_rest_kernel<T><<<blocks_for(active, kRowsPerBlock), kStepThreads, 0, stream>>>(
            active, n, w, out);
    stats_kernel<<<1, kScanThreads, 0, stream>>>(m, active, passes, w.frozen, w.residual,
                                                 w.progress, stats);
    return cudaGetLastError();
}

template <typename T>
cudaError_t fixed_point(int64_t m, int64_t n, idl_matmul matmul_at, const T *c0, const T *x0,
                        idl_act act, idl_solver solver, int64_t check_every, T *x, T *z,
                        double *stats, void *workspace, cudaStream_t stream) {
    Workset<T> w = workset<T>(m, n, workspace);
    const size_t bytes = static_cast<size_t>(m * n) * sizeof(T);
    if (x0 != nullptr)
        IDL_TRY(cudaMemcpyAsync(w.xw, x0, bytes, cudaMemcpyDeviceToDevice, stream));
    else
        IDL_TRY(cudaMemsetAsync(w.xw, 0, bytes, stream));
    return iterate(m, n, matmul_at, ForwardUpdate<T>{act, c0, z}, solver, check_every,
                   x0 == nullptr, w, x, stats, stream);
}

template <typename T>
cudaError_t adjoint(int64_t m, int64_t n, idl_matmul matmul_a, const T *z, const T *g,
                    idl_act act, idl_solver solver, int64_t check_every, T *v, double *stats,
                    void *workspace, cudaStream_t stream) {
    Workset<T> w = workset<T>(m, n, workspace);
    IDL_TRY(cudaMemsetAsync(w.xw, 0, static_cast<size_t>(m * n) * sizeof(T), stream));
    return iterate(m, n, matmul_a, AdjointUpdate<T>{act, z, g}, solver, check_every, true, w, v,
                   stats, stream);
}

}  // namespace
}  // namespace idl_cuda

extern "C" {

int64_t idl_cuda_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size) {
    return idl_cuda::layout(m, n, elem_size).total;
}

cudaError_t idl_cuda_fixed_point_f32(int64_t m, int64_t n, idl_matmul matmul_at,
                                     const float *c0, const float *x0, idl_act act,
                                     idl_solver solver, int64_t check_every, float *x, float *z,
                                     double *stats, void *workspace, cudaStream_t stream) {
    return idl_cuda::fixed_point(m, n, matmul_at, c0, x0, act, solver, check_every, x, z, stats,
                                 workspace, stream);
}

cudaError_t idl_cuda_fixed_point_f64(int64_t m, int64_t n, idl_matmul matmul_at,
                                     const double *c0, const double *x0, idl_act act,
                                     idl_solver solver, int64_t check_every, double *x, double *z,
                                     double *stats, void *workspace, cudaStream_t stream) {
    return idl_cuda::fixed_point(m, n, matmul_at, c0, x0, act, solver, check_every, x, z, stats,
                                 workspace, stream);
}

cudaError_t idl_cuda_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a, const float *z,
                                 const float *g, idl_act act, idl_solver solver,
                                 int64_t check_every, float *v, double *stats, void *workspace,
                                 cudaStream_t stream) {
    return idl_cuda::adjoint(m, n, matmul_a, z, g, act, solver, check_every, v, stats, workspace,
                             stream);
}

cudaError_t idl_cuda_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a, const double *z,
                                 const double *g, idl_act act, idl_solver solver,
                                 int64_t check_every, double *v, double *stats,
                                 void *workspace, cudaStream_t stream) {
    return idl_cuda::adjoint(m, n, matmul_a, z, g, act, solver, check_every, v, stats, workspace,
                             stream);
}

}  // extern "C"
