/*
 * idl_cuda.h: the C API of idl's CUDA kernels.
 *
 * The CUDA twin of idl.h, whose types it reuses (idl_act, idl_projection,
 * idl_matmul, idl_solver). Every pointer is device memory unless said otherwise;
 * every function enqueues its work on `stream` and returns the first CUDA error
 * it met (cudaSuccess otherwise). Nothing here knows torch: csrc/cuda/ops_cuda.cpp
 * checks tensors and calls these functions on torch's current stream.
 *
 * Layout as in idl.h: batch-first, row-major, row i of X at X + i * n.
 */
#ifndef IDL_CUDA_H
#define IDL_CUDA_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "../idl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- projection onto {A : ||A||_inf <= kappa} --------------------------- */

/* Device workspace of a projection (or its backward) of a rows x cols matrix. */
int64_t idl_cuda_project_workspace_bytes(int64_t rows);

/* out (rows x cols, contiguous) = projection of a (row stride lda), as
 * idl_project_linf_*. */
cudaError_t idl_cuda_project_linf_f32(idl_projection mode, int64_t rows,
                                      int64_t cols, const float *a,
                                      int64_t lda, double kappa, float *out,
                                      void *workspace, cudaStream_t stream);
cudaError_t idl_cuda_project_linf_f64(idl_projection mode, int64_t rows,
                                      int64_t cols, const double *a,
                                      int64_t lda, double kappa, double *out,
                                      void *workspace, cudaStream_t stream);

/* grad_a (contiguous) = J(a)^T grad (grad contiguous), as
 * idl_project_linf_backward_*. */
cudaError_t idl_cuda_project_linf_backward_f32(
    idl_projection mode, int64_t rows, int64_t cols, const float *a,
    int64_t lda, double kappa, const float *grad, float *grad_a,
    void *workspace, cudaStream_t stream);
cudaError_t idl_cuda_project_linf_backward_f64(
    idl_projection mode, int64_t rows, int64_t cols, const double *a,
    int64_t lda, double kappa, const double *grad, double *grad_a,
    void *workspace, cudaStream_t stream);

/* ---- fixed-point solves --------------------------------------------------- */

/*
 * The solves of idl.h on the device, same algorithm (Picard or Anderson, same
 * safeguards) and same stopping rule: a sample stops iterating once its own
 * residual ||g(x_k) - x_k||_inf is <= tol, or the solve stops at
 * solver.max_iter, or as soon as an iterate is NaN or Inf. Outputs as in
 * idl.h: every sample gets g at its last iterate.
 *
 * `matmul` multiplies `rows` rows of device memory by the solve's fixed n x n
 * matrix and must enqueue its work on `stream` (the glue calls ATen's GEMM on
 * torch's current stream, which is `stream`). When it returns nonzero (see
 * idl_matmul_fn), the solve stops at once, calls it no more, and returns
 * IDL_CUDA_MATMUL_FAILED; outputs and stats then hold nothing meaningful.
 *
 * The decisions stay on the device: a finished sample's row is frozen at once
 * (later passes skip it). The host never drains the stream: after every
 * `check_every`-th pass it queues a copy of a few counters into `host`'s
 * pinned memory and an event, queues the next pass, and only then waits for
 * the event (the GPU meanwhile busy with that pass). At such a check the rows
 * still moving are packed together, so finished samples leave the GEMM too.
 * Up to check_every passes may run after the last sample finished; they
 * change nothing, and stats still count the passes the solve needed.
 * check_every = 0: no check at all, max_iter passes (finished rows still
 * freeze, and the stats are exact): no host wait, nothing but kernels, GEMMs
 * and memsets on `stream`.
 *
 * `stats` (3 doubles, device) receives [iterations, residual, converged] with
 * the meaning of idl_stats.
 */

/* What a solve returns when its matmul callback failed. A CUDA error code,
 * so that a caller that only checks for cudaSuccess stops too; the callback's
 * own record says what happened (csrc/aten_matmul.h keeps the exception, and
 * the glue rethrows it before looking at the code). */
#define IDL_CUDA_MATMUL_FAILED cudaErrorUnknown

/* Bytes of pinned host memory a solve reads its counters from. */
#define IDL_CUDA_SNAPSHOT_BYTES 64

/* The host side of a solve. `snapshot`: IDL_CUDA_SNAPSHOT_BYTES of pinned
 * host memory (cudaHostAlloc, or torch's pinned allocator), unused with
 * check_every = 0; no copy into it is in flight once the solve returns.
 * `waits` and `checks` are incremented: times the host blocked on an event
 * not yet reached, and counter snapshots read. */
typedef struct {
    void *snapshot;
    int64_t waits;
    int64_t checks;
} idl_cuda_host;

/* Device workspace of a solve of m samples of width n. */
int64_t idl_cuda_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size,
                                       idl_solver solver);

/* Forward: X = φ(X Aᵀ + C0) from X0 (NULL: zeros); `matmul_at` multiplies by
 * Aᵀ. Writes X and Z with X = φ(Z), Z = X_prev Aᵀ + C0 at the last iterate.
 * `inputs_ok` (device, one byte; NULL: not looked at) says whether A and C0
 * are finite, as the caller found on the device: when 0, the solve reports
 * what the CPU does for such inputs, stopped before its first iteration,
 * stats [0, NaN, 0], X and Z all NaN; no host sync is spent on it. */
cudaError_t idl_cuda_fixed_point_f32(int64_t m, int64_t n,
                                     idl_matmul matmul_at, const float *c0,
                                     const float *x0, const uint8_t *inputs_ok,
                                     idl_act act,
                                     idl_solver solver, int64_t check_every,
                                     float *x, float *z, double *stats,
                                     void *workspace, idl_cuda_host *host,
                                     cudaStream_t stream);
cudaError_t idl_cuda_fixed_point_f64(int64_t m, int64_t n,
                                     idl_matmul matmul_at, const double *c0,
                                     const double *x0, const uint8_t *inputs_ok,
                                     idl_act act,
                                     idl_solver solver, int64_t check_every,
                                     double *x, double *z, double *stats,
                                     void *workspace, idl_cuda_host *host,
                                     cudaStream_t stream);

/* Adjoint: V = φ'(Z) ⊙ (V A + G) from V = 0; `matmul_a` multiplies by A. */
cudaError_t idl_cuda_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a,
                                 const float *z, const float *g, idl_act act,
                                 idl_solver solver, int64_t check_every, float *v,
                                 double *stats, void *workspace,
                                 idl_cuda_host *host, cudaStream_t stream);
cudaError_t idl_cuda_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a,
                                 const double *z, const double *g,
                                 idl_act act, idl_solver solver,
                                 int64_t check_every, double *v,
                                 double *stats, void *workspace,
                                 idl_cuda_host *host, cudaStream_t stream);

/* Phantom adjoint (idl.h's idl_phantom_adjoint, the same steps and stats):
 * `steps` damped adjoint steps from V = 0, no host wait; stats on the device,
 * [steps taken, max |ΔV| of the last, 3]. */
int64_t idl_cuda_phantom_workspace_bytes(int64_t m, int64_t n, int64_t elem_size);
cudaError_t idl_cuda_phantom_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a,
                                         const float *z, const float *g, idl_act act,
                                         int64_t steps, double tau, float *v,
                                         double *stats, void *workspace,
                                         cudaStream_t stream);
cudaError_t idl_cuda_phantom_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a,
                                         const double *z, const double *g, idl_act act,
                                         int64_t steps, double tau, double *v,
                                         double *stats, void *workspace,
                                         cudaStream_t stream);

/* ---- SIM's prox ------------------------------------------------------------ */

/* out (rows x cols, contiguous) = the prox of idl_prox_l1_ball_* for each row
 * of w (row stride ldw), thresholds on the device (stride 0: one for all). */
cudaError_t idl_cuda_prox_l1_ball_f32(int64_t rows, int64_t cols, const float *w,
                                      int64_t ldw, const float *threshold,
                                      int64_t threshold_stride, double radius,
                                      int64_t ball_cols, float *out,
                                      cudaStream_t stream);
cudaError_t idl_cuda_prox_l1_ball_f64(int64_t rows, int64_t cols, const double *w,
                                      int64_t ldw, const double *threshold,
                                      int64_t threshold_stride, double radius,
                                      int64_t ball_cols, double *out,
                                      cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* IDL_CUDA_H */
