// fixed_point.cu: the forward and adjoint fixed-point solves on the device,
// with the built-in activations, by Picard iteration, Anderson mixing, or
// "auto" (Picard, each slow sample switching to Anderson). The
// algorithm of csrc/cpu/fixed_point.inc and anderson.inc: x <- g(x) row by
// row, g(x) = step(x M), M a fixed n x n matrix applied by the caller's GEMM,
// a sample leaving the working set once its residual is <= tol (+ rtol |g(x)|).
//
// What differs is who decides. The per-row decisions are taken on the device:
// the step kernel (one warp per working row) computes g(x), its residual,
// Anderson's next iterate where it mixes, and, when the row is done, writes
// its answer and freezes it (later passes skip it). NaN or Inf raises a device
// flag that stops every row from the next pass on. The host never drains the
// stream: after every `check_every`-th pass it queues a copy of a few counters
// into pinned host memory and an event behind it, then queues the next pass,
// and only then waits for that event (usually long done: the GPU is busy with
// the pass just queued). It then stops the loop, or packs the rows still
// moving to the front of the working set (a stable compaction) so the GEMM of
// the next passes covers only them. check_every = 0 never looks: max_iter
// passes, no host wait at all. Finally the stats are computed on the device.
//
// Anderson's state (histories, Gram matrices, safeguard counters) is kept by
// sample, not by working row, so that packing moves only the iterates; and
// g(x) goes straight to the sample's output row each pass (the answer of an
// unfinished sample is g at its last iterate, as in C).
#include <math.h>

#include "../idl_math.h"
#include "common.cuh"
#include "idl_cuda.h"

namespace idl_cuda {
namespace {

constexpr int kStepThreads = 256;                    // 8 warps,
constexpr int kRowsPerBlock = kStepThreads / kWarp;  // one row each
constexpr int kScanThreads = 1024;
constexpr int kMaxMemory = IDL_ANDERSON_MAX_MEMORY;

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
    int bad_inputs;               // A or C0 holds NaN or Inf: no pass does anything
    unsigned long long relative_stops;  // samples that met only tol + rtol ||g(x)||_inf
};
static_assert(sizeof(Progress) <= IDL_CUDA_SNAPSHOT_BYTES, "IDL_CUDA_SNAPSHOT_BYTES too small");

// Anderson's state of each sample (memory 0: Picard, nothing here), and
// auto's (anderson.inc's auto_step): `slow` counts each sample's slow Picard
// steps in a row, -1 once it mixes; NULL for "anderson", whose samples mix
// from the start.
template <typename T>
struct Anderson {
    int memory;
    double regularization;
    double switch_ratio;  // auto: a residual ratio above this is a slow step
    int patience;         // auto: slow steps in a row that switch a sample
    int *slow;            // [sample], auto only
    T *f, *g;             // [sample][memory][n]: residuals and map values
    double *gram;         // [sample][memory][memory]: f_i . f_j
    double *last_res;     // [sample]: residual at the previous step
    int *count;           // [sample]: pairs stored, in slots 0..count-1
    int *next;            // [sample]: the slot the next pair goes to
    int *restarts;        // [sample]: times the safeguard fired
};

// The working set, rows 0..active-1: iterates, GEMM output, the sample of each
// row, whether the row is finished, and its latest residual. `spare_idx`,
// `spare_residual` and `src` serve the compaction.
template <typename T>
struct Workset {
    T *xw;
    T *p;
    long long *idx;
    long long *spare_idx;
    long long *src;
    long long *moving;  // how many rows src lists
    double *residual;
    double *spare_residual;
    int *frozen;
    Progress *progress;
    Anderson<T> acc;
};

// Byte offsets of the workspace's parts, each 256-byte aligned.
struct Layout {
    int64_t xw, p, idx, spare_idx, src, moving, residual, spare_residual, frozen, progress;
    int64_t f, g, gram, last_res, count, next, restarts, slow, total;
};

Layout layout(int64_t m, int64_t n, int64_t elem_size, idl_solver solver) {
    const int64_t M = idl_anderson_memory(solver);
    Layout l;
    int64_t at = 0;
    auto take = [&at](int64_t bytes) {
        const int64_t here = at;
        at += aligned(bytes);
        return here;
    };
    const int64_t index = static_cast<int64_t>(sizeof(long long));
    const int64_t real = static_cast<int64_t>(sizeof(double));
    const int64_t flag = static_cast<int64_t>(sizeof(int));
    l.xw = take(m * n * elem_size);
    l.p = take(m * n * elem_size);
    l.idx = take(m * index);
    l.spare_idx = take(m * index);
    l.src = take(m * index);
    l.moving = take(index);
    l.residual = take(m * real);
    l.spare_residual = take(m * real);
    l.frozen = take(m * flag);
    l.progress = take(sizeof(Progress));
    l.f = take(m * M * n * elem_size);
    l.g = take(m * M * n * elem_size);
    l.gram = take(m * M * M * real);
    l.last_res = take(M > 0 ? m * real : 0);
    l.count = take(M > 0 ? m * flag : 0);
    l.next = take(M > 0 ? m * flag : 0);
    l.restarts = take(M > 0 ? m * flag : 0);
    l.slow = take(solver.method == IDL_AUTO ? m * flag : 0);
    l.total = at;
    return l;
}

template <typename T>
Workset<T> workset(int64_t m, int64_t n, idl_solver solver, void *workspace) {
    const Layout l = layout(m, n, sizeof(T), solver);
    char *base = static_cast<char *>(workspace);
    Anderson<T> acc{static_cast<int>(idl_anderson_memory(solver)),
                    solver.regularization,
                    idl_auto_ratio(solver),
                    static_cast<int>(idl_auto_patience(solver)),
                    solver.method == IDL_AUTO ? reinterpret_cast<int *>(base + l.slow) : nullptr,
                    reinterpret_cast<T *>(base + l.f),
                    reinterpret_cast<T *>(base + l.g),
                    reinterpret_cast<double *>(base + l.gram),
                    reinterpret_cast<double *>(base + l.last_res),
                    reinterpret_cast<int *>(base + l.count),
                    reinterpret_cast<int *>(base + l.next),
                    reinterpret_cast<int *>(base + l.restarts)};
    return {reinterpret_cast<T *>(base + l.xw),
            reinterpret_cast<T *>(base + l.p),
            reinterpret_cast<long long *>(base + l.idx),
            reinterpret_cast<long long *>(base + l.spare_idx),
            reinterpret_cast<long long *>(base + l.src),
            reinterpret_cast<long long *>(base + l.moving),
            reinterpret_cast<double *>(base + l.residual),
            reinterpret_cast<double *>(base + l.spare_residual),
            reinterpret_cast<int *>(base + l.frozen),
            reinterpret_cast<Progress *>(base + l.progress),
            acc};
}

// ---- kernels ------------------------------------------------------------------

// idx[i] = i; and, with Anderson, an empty history for every sample (the
// counters are zeroed by memset; "no previous residual" is Inf).
__global__ void start_kernel(int64_t count, long long *idx, double *last_res) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        idx[i] = i;
        if (last_res != nullptr)
            last_res[i] = INFINITY;
    }
}

// The working rows of a warp-per-row kernel: this warp's first, and the
// stride of the grid-stride loop over rows.
__device__ __forceinline__ int64_t first_row() {
    return blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t row_stride() {
    return static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
}

// Room of one warp for Anderson's small system.
struct MixScratch {
    double system[kMaxMemory * kMaxMemory];
    double weights[kMaxMemory];
    int solved;
};

// Anderson's next iterate of sample s, written to its working row x, from x
// and gx = g(x) whose residual is `res` (finite, > tol): anderson.inc's
// anderson_step, by one warp. Lanes own the entries j = lane (mod 32); the
// small system is solved by lane 0 in shared memory.
template <typename T>
__device__ void anderson_step(const Anderson<T> &a, int64_t s, int64_t n, T *x, const T *gx,
                              double res, MixScratch *scratch) {
    const int lane = threadIdx.x % kWarp;
    const int M = a.memory;
    int count = a.count[s], next = a.next[s], restarts = a.restarts[s];
    double last = a.last_res[s];
    __syncwarp();  // every lane has read the counters before lane 0 writes them
    if (res >= last) {  // the residual did not shrink: forget the history
        count = 0;
        next = 0;
        ++restarts;
    }
    bool mixed = false;
    if (restarts <= IDL_ANDERSON_MAX_RESTARTS) {
        last = res;
        // push the pair (f = gx - x, gx) and its row/column of the Gram matrix
        const int slot = next;
        T *f = a.f + (s * M + slot) * n;
        T *g = a.g + (s * M + slot) * n;
        for (int64_t j = lane; j < n; j += kWarp) {
            g[j] = gx[j];
            f[j] = gx[j] - x[j];
        }
        next = (slot + 1) % M;
        if (count < M)
            ++count;
        double *gram = a.gram + s * M * M;
        for (int t = 0; t < count; ++t) {
            const T *ft = a.f + (s * M + t) * n;
            double dot = 0.0;
            for (int64_t j = lane; j < n; j += kWarp)
                dot += static_cast<double>(f[j]) * ft[j];  // this lane's own f[j]
            dot = warp_reduce(dot, Sum{});
            if (lane == 0)
                gram[slot * M + t] = gram[t * M + slot] = dot;
        }
        const int k = count;
        if (k > 1) {
            if (lane == 0) {
                double trace = 0.0;
                for (int i = 0; i < k; ++i)
                    trace += gram[i * M + i];
                const double ridge = a.regularization * trace / k;
                for (int i = 0; i < k; ++i) {
                    for (int j = 0; j < k; ++j)
                        scratch->system[i * k + j] = gram[i * M + j] + (i == j ? ridge : 0.0);
                    scratch->weights[i] = 1.0;
                }
                scratch->solved = idl_affine_weights(k, scratch->system, scratch->weights);
            }
            __syncwarp();
            mixed = scratch->solved != 0;
            if (mixed) {
                for (int64_t j = lane; j < n; j += kWarp) {
                    T acc = T(0);
                    for (int t = 0; t < k; ++t)
                        acc += static_cast<T>(scratch->weights[t]) * a.g[(s * M + t) * n + j];
                    x[j] = acc;
                }
            } else {  // degenerate history: start afresh
                count = 0;
                next = 0;
                last = INFINITY;
            }
            __syncwarp();  // scratch is read before the warp's next row reuses it
        }
    } else {
        last = INFINITY;  // plain iteration for good: never compared again
    }
    if (!mixed)
        for (int64_t j = lane; j < n; j += kWarp)
            x[j] = gx[j];
    if (lane == 0) {
        a.count[s] = count;
        a.next[s] = next;
        a.restarts[s] = restarts;
        a.last_res[s] = last;
    }
}

// auto, a sample still on Picard steps (anderson.inc's auto_step, by one
// warp): x = g(x), unless its residual has shrunk by less than switch_ratio
// for `patience` steps in a row; then its (empty) history is reset and it
// mixes from this step on. Returns whether it took the Picard step (false:
// it mixes, now or already; anderson_step is the caller's).
template <typename T>
__device__ bool auto_picard_step(const Anderson<T> &a, int64_t s, int64_t n, T *x, const T *gx,
                                 double res) {
    const int lane = threadIdx.x % kWarp;
    int slow = a.slow[s];
    const double last = a.last_res[s];
    __syncwarp();  // every lane has read before lane 0 writes
    if (slow < 0)
        return false;
    slow = res > a.switch_ratio * last ? slow + 1 : 0;
    if (slow >= a.patience) {
        if (lane == 0) {
            a.slow[s] = -1;
            a.count[s] = 0;
            a.next[s] = 0;
            a.last_res[s] = INFINITY;
        }
        __syncwarp();  // anderson_step reads the reset history
        return false;
    }
    for (int64_t j = lane; j < n; j += kWarp)
        x[j] = gx[j];
    if (lane == 0) {
        a.slow[s] = slow;
        a.last_res[s] = res;
    }
    return true;
}

// One pass over the working rows, one warp per row: g(x) from update(p),
// residual max |g(x) - x| (NaN sticky); a row with residual <= tol + rtol
// max |g(x)| (fixed_point.inc's update_rows; rtol 0: tol alone) is done,
// its answer g(x) in its sample's row of `out`, and frozen. Otherwise the
// row moves on: to g(x) (Picard: x is overwritten in place, and copied out
// when done), or to Anderson's mix (g(x) then goes to `out` every pass). A
// row that stopped being finite raises the flag, and from the next pass on
// every row stands still.
template <typename T, typename Update>
__global__ void step_kernel(int64_t active, int64_t n, long long iteration, double tol,
                            double rtol, Update update, Workset<T> w, T *out) {
    __shared__ MixScratch scratch[kRowsPerBlock];
    const long long stopped_at = w.progress->nonfinite_iter;
    if (w.progress->bad_inputs || (stopped_at != 0 && stopped_at < iteration))
        return;
    const int lane = threadIdx.x % kWarp;
    const bool mixing = w.acc.memory > 0;
    for (int64_t r = first_row(); r < active; r += row_stride()) {
        if (w.frozen[r])
            continue;  // the whole warp: r and frozen[r] are the same for its lanes
        const int64_t sample = w.idx[r];
        T *x = w.xw + r * n;
        T *gx = mixing ? out + sample * n : x;
        const T *p = w.p + r * n;
        T worst = T(0), size = T(0);
        for (int64_t j = lane; j < n; j += kWarp) {
            const T gxj = update(sample * n + j, p[j]);
            worst = nan_max(worst, static_cast<T>(fabs(gxj - x[j])));
            if (rtol > 0.0)  // the same branch for the whole kernel
                size = nan_max(size, static_cast<T>(fabs(gxj)));
            gx[j] = gxj;
        }
        worst = warp_nan_max(worst);  // the same in every lane
        const double residual = static_cast<double>(worst);
        const double threshold =
            rtol > 0.0 ? tol + rtol * static_cast<double>(warp_nan_max(size)) : tol;
        if (residual <= threshold) {
            if (!mixing) {
                T *dst = out + sample * n;
                for (int64_t j = lane; j < n; j += kWarp)
                    dst[j] = x[j];  // this lane's own writes above
            }
            if (lane == 0) {
                w.frozen[r] = 1;
                atomicAdd(&w.progress->retired, 1ull);
                atomic_max_nonneg(&w.progress->finished_worst, residual);
                atomicMax(&w.progress->last_retire_iter, iteration);
                if (residual > tol)
                    atomicAdd(&w.progress->relative_stops, 1ull);
            }
            continue;
        }
        if (lane == 0) {
            w.residual[r] = residual;
            if (!isfinite(residual)) {
                atomicMax(&w.progress->nonfinite, isnan(residual) ? 2 : 1);
                atomicCAS(reinterpret_cast<unsigned long long *>(&w.progress->nonfinite_iter),
                          0ull, static_cast<unsigned long long>(iteration));
            }
        }
        if (mixing && isfinite(residual) &&
            !(w.acc.slow != nullptr && auto_picard_step(w.acc, sample, n, x, gx, residual)))
            anderson_step(w.acc, sample, n, x, gx, residual, &scratch[threadIdx.x / kWarp]);
    }
}

// One block: src[k] = the k-th working row (in order) that is not frozen.
// Each thread scans a contiguous chunk; a block-wide exclusive scan of the
// chunk counts gives each chunk its first slot. *moving gets the count.
__global__ void pack_scan_kernel(int64_t active, const int *frozen, long long *src,
                                 long long *moving_rows) {
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
    if (threadIdx.x == blockDim.x - 1)
        *moving_rows = offsets[threadIdx.x];
}

// Row k of the packed set, from working row src[k]: iterate into `to_x`,
// sample and residual into `to_idx` and `to_residual`, not frozen. The host
// sized the packed set from counters read a pass earlier: rows that finished
// since are not in src, and the slots they leave at the end (k >= *moving)
// are marked frozen, so every later kernel skips them.
template <typename T>
__global__ void pack_gather_kernel(int64_t kept, int64_t n, const long long *src,
                                   const long long *moving, const T *from_x,
                                   const long long *from_idx, const double *from_residual,
                                   T *to_x, long long *to_idx, double *to_residual,
                                   int *frozen) {
    const int lane = threadIdx.x % kWarp;
    const int64_t rows = *moving;
    for (int64_t k = first_row(); k < kept; k += row_stride()) {
        if (k >= rows) {
            if (lane == 0)
                frozen[k] = 1;
            continue;
        }
        const int64_t r = src[k];
        for (int64_t j = lane; j < n; j += kWarp)
            to_x[k * n + j] = from_x[r * n + j];
        if (lane == 0) {
            to_idx[k] = from_idx[r];
            to_residual[k] = from_residual[r];
            frozen[k] = 0;
        }
    }
}

// Picard rows never finished go to their sample's row of out as they stand
// (Anderson's are there already).
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
// them (converged: 1 every sample met tol, 2 some only tol + rtol |g(x)|, 0
// not converged; csrc/ops.cpp's stats_tensor). `passes` is the number of
// passes the host ran.
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
    stats[2] = !converged ? 0.0 : s.relative_stops > 0 ? 2.0 : 1.0;
}

// A forward solve whose A or C0 holds NaN or Inf (*inputs_ok == 0, found by
// the caller on the device) is reported as the CPU reports it, stopped before
// its first iteration: the flag stops every pass and reads as a NaN residual
// at iteration 0 (so the host's next check ends the loop), and
// poison_kernel then fills X and Z with NaN.
__global__ void inputs_kernel(const uint8_t *inputs_ok, Progress *progress) {
    if (*inputs_ok == 0) {
        progress->bad_inputs = 1;
        progress->nonfinite = 2;
    }
}

template <typename T>
__global__ void poison_kernel(int64_t count, const Progress *progress, T *x, T *z) {
    if (!progress->bad_inputs)
        return;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        x[i] = static_cast<T>(NAN);
        z[i] = static_cast<T>(NAN);
    }
}

// The stats of a solve with nothing to solve (m or n is 0), as the C solver
// reports them: no iteration, converged; unless A holds NaN or Inf (see
// inputs_kernel), which the CPU reports for an empty batch too.
__global__ void nothing_to_solve_kernel(const uint8_t *inputs_ok, double *stats) {
    const bool bad = inputs_ok != nullptr && *inputs_ok == 0;
    stats[0] = 0.0;
    stats[1] = bad ? nan("") : 0.0;
    stats[2] = bad ? 0.0 : 1.0;
}

// ---- the host loop ---------------------------------------------------------------

// Pack the unfinished rows of the first `active` working rows to the front,
// into `kept` slots (at least as many as there are such rows). The packed
// iterates go to the GEMM output buffer, free until the next GEMM, and the
// buffers trade places.
template <typename T>
cudaError_t pack(Workset<T> &w, int64_t active, int64_t kept, int64_t n, cudaStream_t stream) {
    pack_scan_kernel<<<1, kScanThreads, 0, stream>>>(active, w.frozen, w.src, w.moving);
    pack_gather_kernel<T><<<blocks_for(kept, kRowsPerBlock), kStepThreads, 0, stream>>>(
        kept, n, w.src, w.moving, w.xw, w.idx, w.residual, w.p, w.spare_idx, w.spare_residual,
        w.frozen);
    IDL_TRY(cudaGetLastError());
    T *x = w.xw;
    w.xw = w.p;
    w.p = x;
    long long *idx = w.idx;
    w.idx = w.spare_idx;
    w.spare_idx = idx;
    double *residual = w.residual;
    w.residual = w.spare_residual;
    w.spare_residual = residual;
    return cudaSuccess;
}

// The host's view of the counters: a copy in pinned memory, the event that
// says it has landed, and whether one is on its way.
struct Snapshot {
    Progress *seen;  // pinned host memory
    cudaEvent_t landed;
    bool pending;
    idl_cuda_host *host;
};

// Wait for the snapshot on its way (counted when the host had to block).
cudaError_t wait_for(Snapshot &snap) {
    snap.pending = false;
    const cudaError_t ready = cudaEventQuery(snap.landed);
    if (ready == cudaSuccess)
        return cudaSuccess;
    if (ready != cudaErrorNotReady)
        return ready;
    // "not ready" is recorded as the thread's last error: cleared, or the next
    // launch check would take it for a failure (every launch is checked at
    // once, so no real error is pending here)
    (void)cudaGetLastError();
    ++snap.host->waits;
    return cudaEventSynchronize(snap.landed);
}

// The shared loop of both solves, on m samples whose first iterate is in w.xw.
// When that iterate is all zeros (`zero_start`), its product is too and the
// first GEMM is skipped, as in C (an A holding NaN or Inf then shows from the
// second product on, at the same iteration as on the CPU).
template <typename T, typename Update>
cudaError_t iterate(int64_t m, int64_t n, idl_matmul mm, Update update, idl_solver solver,
                    int64_t check_every, bool zero_start, const uint8_t *inputs_ok,
                    Workset<T> w, T *out, double *stats, idl_cuda_host *host,
                    cudaStream_t stream) {
    if (check_every < 0)
        return cudaErrorInvalidValue;
    if (m == 0 || n == 0) {  // nothing to solve, and no buffer to touch
        nothing_to_solve_kernel<<<1, 1, 0, stream>>>(inputs_ok, stats);
        return cudaGetLastError();
    }
    IDL_TRY(cudaMemsetAsync(w.frozen, 0, m * sizeof(int), stream));
    IDL_TRY(cudaMemsetAsync(w.progress, 0, sizeof(Progress), stream));
    // read by stats_kernel for every unfinished row, even after no pass
    IDL_TRY(cudaMemsetAsync(w.residual, 0, m * sizeof(double), stream));
    if (w.acc.memory > 0) {
        IDL_TRY(cudaMemsetAsync(w.acc.count, 0, m * sizeof(int), stream));
        IDL_TRY(cudaMemsetAsync(w.acc.next, 0, m * sizeof(int), stream));
        IDL_TRY(cudaMemsetAsync(w.acc.restarts, 0, m * sizeof(int), stream));
        if (w.acc.slow != nullptr)  // auto: every sample starts on Picard steps
            IDL_TRY(cudaMemsetAsync(w.acc.slow, 0, m * sizeof(int), stream));
    }
    start_kernel<<<blocks_for(m < 65536 * 256 ? m : 65536 * 256, 256), 256, 0, stream>>>(
        m, w.idx, w.acc.memory > 0 ? w.acc.last_res : nullptr);
    if (inputs_ok != nullptr)
        inputs_kernel<<<1, 1, 0, stream>>>(inputs_ok, w.progress);
    IDL_TRY(cudaGetLastError());
    Snapshot snap{static_cast<Progress *>(host->snapshot), nullptr, false, host};
    if (check_every > 0)
        IDL_TRY(cudaEventCreateWithFlags(&snap.landed, cudaEventDisableTiming));
    cudaError_t status = cudaSuccess;
    int64_t active = m;  // working rows, finished ones included until packed
    long long passes = 0;
    while (active > 0 && passes < solver.max_iter) {
        if (passes == 0 && zero_start)
            status = cudaMemsetAsync(w.p, 0, static_cast<size_t>(active * n) * sizeof(T), stream);
        else if (mm.matmul(mm.ctx, active, w.xw, w.p) != 0)
            status = IDL_CUDA_MATMUL_FAILED;
        if (status != cudaSuccess)
            break;
        ++passes;
        step_kernel<T, Update><<<blocks_for(active, kRowsPerBlock), kStepThreads, 0, stream>>>(
            active, n, passes, solver.tol, solver.rtol, update, w, out);
        if ((status = cudaGetLastError()) != cudaSuccess)
            break;
        if (snap.pending) {  // the counters of the previous check: read them now
            if ((status = wait_for(snap)) != cudaSuccess)
                break;
            ++host->checks;
            const Progress seen = *snap.seen;
            if (seen.nonfinite != 0)
                break;
            const int64_t kept = m - static_cast<int64_t>(seen.retired);
            if (kept == 0) {
                active = 0;
                break;
            }
            if (kept < active) {
                if ((status = pack(w, active, kept, n, stream)) != cudaSuccess)
                    break;
                active = kept;
            }
        }
        if (check_every > 0 && passes % check_every == 0) {
            status = cudaMemcpyAsync(snap.seen, w.progress, sizeof(Progress),
                                     cudaMemcpyDeviceToHost, stream);
            if (status == cudaSuccess)
                status = cudaEventRecord(snap.landed, stream);
            if (status != cudaSuccess)
                break;
            snap.pending = true;
        }
    }
    // No copy may still be on its way into the caller's pinned memory.
    if (snap.pending) {
        const cudaError_t waited = wait_for(snap);
        status = status != cudaSuccess ? status : waited;
    }
    if (snap.landed != nullptr)
        cudaEventDestroy(snap.landed);
    IDL_TRY(status);
    if (active > 0 && w.acc.memory == 0)
        retire_rest_kernel<T><<<blocks_for(active, kRowsPerBlock), kStepThreads, 0, stream>>>(
            active, n, w, out);
    stats_kernel<<<1, kScanThreads, 0, stream>>>(m, active, passes, w.frozen, w.residual,
                                                 w.progress, stats);
    return cudaGetLastError();
}

template <typename T>
cudaError_t fixed_point(int64_t m, int64_t n, idl_matmul matmul_at, const T *c0, const T *x0,
                        const uint8_t *inputs_ok, idl_act act, idl_solver solver,
                        int64_t check_every, T *x, T *z, double *stats, void *workspace,
                        idl_cuda_host *host, cudaStream_t stream) {
    Workset<T> w = workset<T>(m, n, solver, workspace);
    const size_t bytes = static_cast<size_t>(m * n) * sizeof(T);
    if (x0 != nullptr)
        IDL_TRY(cudaMemcpyAsync(w.xw, x0, bytes, cudaMemcpyDeviceToDevice, stream));
    else
        IDL_TRY(cudaMemsetAsync(w.xw, 0, bytes, stream));
    IDL_TRY(iterate(m, n, matmul_at, ForwardUpdate<T>{act, c0, z}, solver, check_every,
                    x0 == nullptr, inputs_ok, w, x, stats, host, stream));
    if (inputs_ok == nullptr || m * n == 0)
        return cudaSuccess;
    poison_kernel<T><<<blocks_for(m * n < 65536 * 256 ? m * n : 65536 * 256, 256), 256, 0,
                       stream>>>(m * n, w.progress, x, z);
    return cudaGetLastError();
}

template <typename T>
cudaError_t adjoint(int64_t m, int64_t n, idl_matmul matmul_a, const T *z, const T *g,
                    idl_act act, idl_solver solver, int64_t check_every, T *v, double *stats,
                    void *workspace, idl_cuda_host *host, cudaStream_t stream) {
    Workset<T> w = workset<T>(m, n, solver, workspace);
    IDL_TRY(cudaMemsetAsync(w.xw, 0, static_cast<size_t>(m * n) * sizeof(T), stream));
    return iterate(m, n, matmul_a, AdjointUpdate<T>{act, z, g}, solver, check_every, true,
                   nullptr, w, v, stats, host, stream);
}

}  // namespace
}  // namespace idl_cuda

extern "C" {

int64_t idl_cuda_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size,
                                       idl_solver solver) {
    return idl_cuda::layout(m, n, elem_size, solver).total;
}

cudaError_t idl_cuda_fixed_point_f32(int64_t m, int64_t n, idl_matmul matmul_at,
                                     const float *c0, const float *x0,
                                     const uint8_t *inputs_ok, idl_act act,
                                     idl_solver solver, int64_t check_every, float *x, float *z,
                                     double *stats, void *workspace, idl_cuda_host *host,
                                     cudaStream_t stream) {
    return idl_cuda::fixed_point(m, n, matmul_at, c0, x0, inputs_ok, act, solver, check_every,
                                 x, z, stats, workspace, host, stream);
}

cudaError_t idl_cuda_fixed_point_f64(int64_t m, int64_t n, idl_matmul matmul_at,
                                     const double *c0, const double *x0,
                                     const uint8_t *inputs_ok, idl_act act,
                                     idl_solver solver, int64_t check_every, double *x, double *z,
                                     double *stats, void *workspace, idl_cuda_host *host,
                                     cudaStream_t stream) {
    return idl_cuda::fixed_point(m, n, matmul_at, c0, x0, inputs_ok, act, solver, check_every,
                                 x, z, stats, workspace, host, stream);
}

cudaError_t idl_cuda_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a, const float *z,
                                 const float *g, idl_act act, idl_solver solver,
                                 int64_t check_every, float *v, double *stats, void *workspace,
                                 idl_cuda_host *host, cudaStream_t stream) {
    return idl_cuda::adjoint(m, n, matmul_a, z, g, act, solver, check_every, v, stats, workspace,
                             host, stream);
}

cudaError_t idl_cuda_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a, const double *z,
                                 const double *g, idl_act act, idl_solver solver,
                                 int64_t check_every, double *v, double *stats,
                                 void *workspace, idl_cuda_host *host, cudaStream_t stream) {
    return idl_cuda::adjoint(m, n, matmul_a, z, g, act, solver, check_every, v, stats, workspace,
                             host, stream);
}

}  // extern "C"
