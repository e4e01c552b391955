// projection.cu: projection of a matrix onto the inf-norm ball and its
// vector-Jacobian product, on the device. Same results as csrc/cpu/projection.inc
// up to the order of floating-point sums.
//
// Exact mode, one block per row. The row is projected onto the l1 ball of
// radius kappa: a -> sign(a) * max(|a| - theta, 0). theta comes from
// Michelot's iteration, sort-free: theta = (sum of the entries in play -
// kappa) / (their count), then drop the entries at or below theta, repeat until
// nothing drops. Every theta is a lower bound of the true one, so an entry
// once dropped stays dropped; the block therefore needs no compacted copy of the
// row: each pass is one sweep over the whole row with two block reductions
// (sum and count of |a_j| > theta), and the pass count is small in practice
// (at most n). Sums are in double, as in C.
//
// Scale mode: one block per row for the row sums (and <grad, A> row by row),
// one block to find the largest row sum and its first row, then an elementwise
// pass.
#include <math.h>

#include "common.cuh"
#include "idl_cuda.h"

namespace idl_cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kScaleThreads = 256;

// |a_j| summed over a row, to every thread of the block.
template <typename T>
__device__ double row_l1(int64_t n, const T *a, double *partial) {
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        sum += fabs(static_cast<double>(a[j]));
    return block_sum(sum, partial);
}

// theta of a row with ||a||_1 = l1 > kappa (Michelot, see the file comment).
// theta never decreases, so the set in play only shrinks and the loop ends.
template <typename T>
__device__ double l1_threshold(int64_t n, const T *a, double l1, double kappa,
                               double *partial) {
    double kept = static_cast<double>(n);
    double theta = (l1 - kappa) / kept;
    for (;;) {
        double sum = 0.0, count = 0.0;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const double magnitude = fabs(static_cast<double>(a[j]));
            if (magnitude > theta) {
                sum += magnitude;
                count += 1.0;
            }
        }
        sum = block_sum(sum, partial);
        count = block_sum(count, partial);
        if (count >= kept || count == 0.0)
            return theta;
        kept = count;
        theta = fmax(theta, (sum - kappa) / kept);
    }
}

template <typename T>
__global__ void project_exact_kernel(int64_t cols, const T *a, int64_t lda, double kappa,
                                     T *out) {
    __shared__ double partial[kWarp];
    const T *row = a + blockIdx.x * lda;
    T *dst = out + blockIdx.x * cols;
    const double l1 = row_l1(cols, row, partial);
    if (l1 <= kappa) {
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
            dst[j] = row[j];
        return;
    }
    const double theta = l1_threshold(cols, row, l1, kappa, partial);
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const double entry = static_cast<double>(row[j]);
        const double shrunk = fabs(entry) - theta;
        dst[j] = shrunk > 0.0 ? static_cast<T>(copysign(shrunk, entry)) : T(0);
    }
}

// J^T grad for a projected row: J = diag(1_S) - s_S s_S^T / |S| with
// S = {|a_j| > theta} and s = sign(a); J is symmetric.
template <typename T>
__global__ void project_exact_vjp_kernel(int64_t cols, const T *a, int64_t lda, double kappa,
                                         const T *grad, T *grad_a) {
    __shared__ double partial[kWarp];
    const T *row = a + blockIdx.x * lda;
    const T *g = grad + blockIdx.x * cols;
    T *dst = grad_a + blockIdx.x * cols;
    const double l1 = row_l1(cols, row, partial);
    if (l1 <= kappa) {
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
            dst[j] = g[j];
        return;
    }
    const double theta = l1_threshold(cols, row, l1, kappa, partial);
    double signed_sum = 0.0, active = 0.0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        if (fabs(static_cast<double>(row[j])) > theta) {
            signed_sum += row[j] > 0 ? g[j] : -g[j];
            active += 1.0;
        }
    }
    signed_sum = block_sum(signed_sum, partial);
    active = block_sum(active, partial);
    const double mean = signed_sum / active;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        if (fabs(static_cast<double>(row[j])) > theta)
            dst[j] = static_cast<T>(g[j] - (row[j] > 0 ? mean : -mean));
        else
            dst[j] = T(0);
    }
}

// ---- scale mode ---------------------------------------------------------------

// What the scale mode needs to know of the whole matrix.
struct ScaleInfo {
    double norm;       // largest row sum of |A|
    long long argmax;  // first row attaining it (0 if every row sum is 0)
    double inner;      // <grad, A>, backward only
};

// The workspace: per-row l1 norms and per-row <grad, A>, then a ScaleInfo.
struct ScaleWork {
    double *row_norm;
    double *row_inner;
    ScaleInfo *info;
};

int64_t scale_info_offset(int64_t rows) {
    const int64_t bytes = 2 * rows * static_cast<int64_t>(sizeof(double));
    return (bytes + 255) / 256 * 256;
}

ScaleWork scale_work(int64_t rows, void *workspace) {
    auto *base = static_cast<char *>(workspace);
    auto *doubles = reinterpret_cast<double *>(base);
    return {doubles, doubles + rows,
            reinterpret_cast<ScaleInfo *>(base + scale_info_offset(rows))};
}

// Row sums of |A| and, with grad, row sums of grad ⊙ A.
template <typename T>
__global__ void row_sums_kernel(int64_t cols, const T *a, int64_t lda, const T *grad,
                                double *row_norm, double *row_inner) {
    __shared__ double partial[kWarp];
    const T *row = a + blockIdx.x * lda;
    const double l1 = row_l1(cols, row, partial);
    if (grad == nullptr) {
        if (threadIdx.x == 0)
            row_norm[blockIdx.x] = l1;
        return;
    }
    const T *g = grad + blockIdx.x * cols;
    double inner = 0.0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        inner += static_cast<double>(g[j]) * static_cast<double>(row[j]);
    inner = block_sum(inner, partial);
    if (threadIdx.x == 0) {
        row_norm[blockIdx.x] = l1;
        row_inner[blockIdx.x] = inner;
    }
}

// (norm, row) candidates ordered as the C loop `if (sum > best)` from best = 0
// visits them: a larger norm wins, a tie goes to the earlier row, NaN never wins.
__device__ __forceinline__ bool beats(double norm, long long row, double best_norm,
                                      long long best_row) {
    return norm > best_norm || (norm == best_norm && row < best_row);
}

// One block: the largest row sum, its first row, and the total <grad, A>.
__global__ void scale_info_kernel(int64_t rows, const double *row_norm,
                                  const double *row_inner, ScaleInfo *info) {
    __shared__ double norms[kScaleThreads];
    __shared__ long long argmaxes[kScaleThreads];
    __shared__ double partial[kWarp];
    double best = 0.0, inner = 0.0;
    long long best_row = 0;
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
        if (beats(row_norm[i], i, best, best_row)) {
            best = row_norm[i];
            best_row = i;
        }
        if (row_inner != nullptr)
            inner += row_inner[i];
    }
    inner = block_sum(inner, partial);
    norms[threadIdx.x] = best;
    argmaxes[threadIdx.x] = best_row;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride &&
            beats(norms[threadIdx.x + stride], argmaxes[threadIdx.x + stride],
                  norms[threadIdx.x], argmaxes[threadIdx.x])) {
            norms[threadIdx.x] = norms[threadIdx.x + stride];
            argmaxes[threadIdx.x] = argmaxes[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *info = ScaleInfo{norms[0], argmaxes[0], inner};
}

// out = A * kappa / norm when norm > kappa, else A.
template <typename T>
__global__ void scale_apply_kernel(int64_t rows, int64_t cols, const T *a, int64_t lda,
                                   double kappa, const ScaleInfo *info, T *out) {
    const double norm = info->norm;
    const double factor = norm > kappa ? kappa / norm : 1.0;
    const int64_t total = rows * cols;
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t i = k / cols, j = k % cols;
        out[k] = static_cast<T>(factor * a[i * lda + j]);
    }
}

// P = kappa A / s with s = max_i ||a_i||_1 gives
// grad_A = (kappa/s) G - (kappa/s^2) <G, A> sign(a_i*) on the maximising row i*.
template <typename T>
__global__ void scale_vjp_kernel(int64_t rows, int64_t cols, const T *a, int64_t lda,
                                 double kappa, const ScaleInfo *info, const T *grad,
                                 T *grad_a) {
    const double norm = info->norm;
    const bool scaled = norm > kappa;
    const double factor = kappa / norm;
    const double through_norm = kappa * info->inner / (norm * norm);
    const int64_t total = rows * cols;
    for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        if (!scaled) {
            grad_a[k] = grad[k];
            continue;
        }
        const int64_t i = k / cols, j = k % cols;
        T value = static_cast<T>(factor * grad[k]);
        const T entry = a[i * lda + j];
        if (i == info->argmax && entry != T(0))
            value -= static_cast<T>(entry > 0 ? through_norm : -through_norm);
        grad_a[k] = value;
    }
}

// An elementwise grid: enough blocks to fill the device, a grid-stride loop
// for the rest.
unsigned elementwise_blocks(int64_t total) {
    const int64_t wanted = (total + kScaleThreads - 1) / kScaleThreads;
    return static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
}

template <typename T>
cudaError_t project(idl_projection mode, int64_t rows, int64_t cols, const T *a,
                    int64_t lda, double kappa, T *out, void *workspace,
                    cudaStream_t stream) {
    if (rows == 0 || cols == 0)
        return cudaSuccess;
    if (mode == IDL_PROJECT_EXACT) {
        project_exact_kernel<T><<<blocks_for(rows, 1), kRowThreads, 0, stream>>>(
            cols, a, lda, kappa, out);
        return cudaGetLastError();
    }
    const ScaleWork work = scale_work(rows, workspace);
    row_sums_kernel<T><<<blocks_for(rows, 1), kRowThreads, 0, stream>>>(
        cols, a, lda, nullptr, work.row_norm, nullptr);
    scale_info_kernel<<<1, kScaleThreads, 0, stream>>>(rows, work.row_norm, nullptr,
                                                       work.info);
    scale_apply_kernel<T><<<elementwise_blocks(rows * cols), kScaleThreads, 0, stream>>>(
        rows, cols, a, lda, kappa, work.info, out);
    return cudaGetLastError();
}

template <typename T>
cudaError_t project_backward(idl_projection mode, int64_t rows, int64_t cols, const T *a,
                             int64_t lda, double kappa, const T *grad, T *grad_a,
                             void *workspace, cudaStream_t stream) {
    if (rows == 0 || cols == 0)
        return cudaSuccess;
    if (mode == IDL_PROJECT_EXACT) {
        project_exact_vjp_kernel<T><<<blocks_for(rows, 1), kRowThreads, 0, stream>>>(
            cols, a, lda, kappa, grad, grad_a);
        return cudaGetLastError();
    }
    const ScaleWork work = scale_work(rows, workspace);
    row_sums_kernel<T><<<blocks_for(rows, 1), kRowThreads, 0, stream>>>(
        cols, a, lda, grad, work.row_norm, work.row_inner);
    scale_info_kernel<<<1, kScaleThreads, 0, stream>>>(rows, work.row_norm, work.row_inner,
                                                       work.info);
    scale_vjp_kernel<T><<<elementwise_blocks(rows * cols), kScaleThreads, 0, stream>>>(
        rows, cols, a, lda, kappa, work.info, grad, grad_a);
    return cudaGetLastError();
}

}  // namespace
}  // namespace idl_cuda

extern "C" {

int64_t idl_cuda_project_workspace_bytes(int64_t rows) {
    return idl_cuda::scale_info_offset(rows) +
           static_cast<int64_t>(sizeof(idl_cuda::ScaleInfo));
}

cudaError_t idl_cuda_project_linf_f32(idl_projection mode, int64_t rows, int64_t cols,
                                      const float *a, int64_t lda, double kappa, float *out,
                                      void *workspace, cudaStream_t stream) {
    return idl_cuda::project(mode, rows, cols, a, lda, kappa, out, workspace, stream);
}

cudaError_t idl_cuda_project_linf_f64(idl_projection mode, int64_t rows, int64_t cols,
                                      const double *a, int64_t lda, double kappa, double *out,
                                      void *workspace, cudaStream_t stream) {
    return idl_cuda::project(mode, rows, cols, a, lda, kappa, out, workspace, stream);
}

cudaError_t idl_cuda_project_linf_backward_f32(idl_projection mode, int64_t rows,
                                               int64_t cols, const float *a, int64_t lda,
                                               double kappa, const float *grad, float *grad_a,
                                               void *workspace, cudaStream_t stream) {
    return idl_cuda::project_backward(mode, rows, cols, a, lda, kappa, grad, grad_a, workspace,
                                      stream);
}

cudaError_t idl_cuda_project_linf_backward_f64(idl_projection mode, int64_t rows,
                                               int64_t cols, const double *a, int64_t lda,
                                               double kappa, const double *grad,
                                               double *grad_a, void *workspace,
                                               cudaStream_t stream) {
    return idl_cuda::project_backward(mode, rows, cols, a, lda, kappa, grad, grad_a, workspace,
                                      stream);
}

}  // extern "C"
