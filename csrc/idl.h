/*
 * idl.h: the C API of idl's numerical kernels.
 *
 * Plain C11. The kernels take pointers, sizes and row strides and know nothing
 * of torch; csrc/ops.cpp checks tensors and calls them. Every kernel comes in a
 * float (`_f32`) and a double (`_f64`) version.
 *
 * Layout is batch-first and row-major, as in PyTorch: a batch of states X is
 * (m samples) x (n features), row i at X + i * n.
 */
#ifndef IDL_H
#define IDL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- activations -------------------------------------------------------- */

/* The built-in activations φ, all 1-Lipschitz. `param` is the negative slope of
 * IDL_LEAKY_RELU and is ignored by the others. */
typedef enum {
    IDL_IDENTITY = 0,
    IDL_RELU = 1,
    IDL_LEAKY_RELU = 2,
    IDL_TANH = 3,
    IDL_HARDTANH = 4, /* clamp to [-1, 1] */
    IDL_SIGMOID = 5,
    IDL_SOFTPLUS = 6  /* log(1 + e^z), beta 1 */
} idl_activation;

typedef struct {
    idl_activation kind;
    double param;
} idl_act;

/* out = φ'(z) elementwise, for `count` contiguous values. */
void idl_dphi_f32(idl_act act, int64_t count, const float *z, float *out);
void idl_dphi_f64(idl_act act, int64_t count, const double *z, double *out);

/* 1 if none of the n contiguous values is NaN or Inf, else 0. */
int idl_all_finite_f32(int64_t n, const float *a);
int idl_all_finite_f64(int64_t n, const double *a);

/* ---- projection onto {A : ||A||_inf <= kappa} --------------------------- */

typedef enum {
    IDL_PROJECT_EXACT = 0, /* Euclidean projection: each row onto the l1 ball */
    IDL_PROJECT_SCALE = 1  /* A * kappa / ||A||_inf when ||A||_inf > kappa   */
} idl_projection;

/* out (rows x cols, contiguous) = projection of a (row stride lda). */
void idl_project_linf_f32(idl_projection mode, int64_t rows, int64_t cols,
                          const float *a, int64_t lda, double kappa,
                          float *out);
void idl_project_linf_f64(idl_projection mode, int64_t rows, int64_t cols,
                          const double *a, int64_t lda, double kappa,
                          double *out);

/* grad_a (contiguous) = J(a)^T grad, the vector-Jacobian product of the
 * projection at a. */
void idl_project_linf_backward_f32(idl_projection mode, int64_t rows,
                                   int64_t cols, const float *a, int64_t lda,
                                   double kappa, const float *grad,
                                   float *grad_a);
void idl_project_linf_backward_f64(idl_projection mode, int64_t rows,
                                   int64_t cols, const double *a, int64_t lda,
                                   double kappa, const double *grad,
                                   double *grad_a);

/* ---- fixed-point solves --------------------------------------------------- */

/* out (rows x n) = left (rows x n) times a fixed n x n matrix held in ctx. The
 * caller supplies it (csrc/ops.cpp routes it to ATen's GEMM). Returns 0, or
 * nonzero when it failed: the solve then stops at once, calls it no more, and
 * reports the value in idl_stats.error. The callback must not unwind through
 * the solve (C frames): a C++ one catches its exceptions and keeps them in
 * ctx for its caller to rethrow (csrc/aten_matmul.h). */
typedef int (*idl_matmul_fn)(void *ctx, int64_t rows, const void *left,
                             void *out);

typedef struct {
    idl_matmul_fn matmul;
    void *ctx;
} idl_matmul;

/* How a solve iterates and when it stops: at `max_iter` iterations, or once
 * every sample has met its stopping test
 *     ||g(x_k) - x_k||_inf <= tol + rtol * ||g(x_k)||_inf,
 * g being the map of the solve (rtol 0: the absolute test alone).
 * IDL_ANDERSON mixes the last `memory` iterates of each sample
 * (1 <= memory <= IDL_ANDERSON_MAX_MEMORY) with a ridge of `regularization`
 * (the ops: IDL_ANDERSON_REGULARIZATION) times the mean diagonal of their
 * Gram matrix; where a step does not shrink a sample's residual, that sample
 * falls back to a plain Picard step (for good after more than
 * IDL_ANDERSON_MAX_RESTARTS such fallbacks: see csrc/cpu/anderson.inc).
 * IDL_AUTO starts every sample on Picard steps and switches a sample to
 * Anderson (for the rest of the solve) once its residual ratio
 * res_k / res_{k-1} has been above `switch_ratio` for `switch_patience`
 * iterations in a row (0 in either: IDL_AUTO_SWITCH_RATIO,
 * IDL_AUTO_SWITCH_PATIENCE). A sample that contracts fast never pays for
 * Anderson's history. The ratio 0.7 is measured (benchmarks/README.md):
 * briefly trained weights contract at 0.72-0.84 per Picard step, where
 * Anderson takes a third of the iterations, and random ones at ~0.4; at 0.8
 * the trained κ = 0.99 problems never switched.
 * The fields after `regularization` default to 0 (aggregate initialisation
 * of the first five), which is the behaviour before they existed. */
typedef enum { IDL_PICARD = 0, IDL_ANDERSON = 1, IDL_AUTO = 2 } idl_method;
#define IDL_METHOD_COUNT 3

/* The solver registry: each method's name and the solver's limits and
 * defaults, defined here once. csrc/checks.h parses and checks the ops'
 * arguments with them, and idl._C exposes them to Python (SOLVER_METHODS,
 * ANDERSON_MAX_MEMORY, ...: csrc/ops.cpp), where idl/functional.py reads them. */

/* The name the ops take for `method` (0 <= method < IDL_METHOD_COUNT), or
 * NULL for any other value. */
static inline const char *idl_method_name(int method)
{
    static const char *const names[IDL_METHOD_COUNT] = {"picard", "anderson", "auto"};
    return method >= 0 && method < IDL_METHOD_COUNT ? names[method] : NULL;
}

#define IDL_ANDERSON_MAX_MEMORY 16
/* The ridge the ops give Anderson's small systems, relative to the mean
 * diagonal of the Gram matrix: enough to keep them solvable, far below what
 * would slow convergence. */
#define IDL_ANDERSON_REGULARIZATION 1e-10
/* Safeguard fallbacks after which a sample keeps to plain iteration (see
 * csrc/cpu/anderson.inc), the same on both devices. */
#define IDL_ANDERSON_MAX_RESTARTS 8
#define IDL_AUTO_SWITCH_RATIO 0.7
#define IDL_AUTO_SWITCH_PATIENCE 3

typedef struct {
    idl_method method;
    int64_t max_iter;
    double tol;
    int64_t memory;
    double regularization;
    double rtol;             /* relative tolerance, >= 0 (0: none)   */
    double switch_ratio;     /* IDL_AUTO (0: IDL_AUTO_SWITCH_RATIO)   */
    int64_t switch_patience; /* IDL_AUTO (0: IDL_AUTO_SWITCH_PATIENCE) */
} idl_solver;

/* Past iterates a solve keeps per sample (Anderson's, and auto's once a
 * sample switches); none for Picard. */
static inline int64_t idl_anderson_memory(idl_solver solver)
{
    return solver.method == IDL_PICARD ? 0 : solver.memory;
}

/* IDL_AUTO's switching rule with the defaults filled in. */
static inline double idl_auto_ratio(idl_solver solver)
{
    return solver.switch_ratio > 0.0 ? solver.switch_ratio : IDL_AUTO_SWITCH_RATIO;
}

static inline int64_t idl_auto_patience(idl_solver solver)
{
    return solver.switch_patience > 0 ? solver.switch_patience : IDL_AUTO_SWITCH_PATIENCE;
}

/* What a solve did. `residual` is the largest final residual over samples,
 * NaN or Inf when an iterate stopped being finite (the solve stops there).
 * `error` is 0, or the nonzero value the matmul callback returned: then the
 * solve stopped right there, and its outputs hold nothing meaningful.
 * `relative_stops` counts the samples that stopped on the relative part of
 * the test (residual above tol, within tol + rtol ||g(x)||_inf);
 * `switched` the samples IDL_AUTO moved to Anderson. */
typedef struct {
    int64_t iterations;
    double residual;
    int converged;
    int error;
    int64_t relative_stops;
    int64_t switched;
} idl_stats;

/* Bytes of workspace a solve of m samples of width n needs. */
int64_t idl_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size,
                                  idl_solver solver);

/* Forward: X = φ(X Aᵀ + C0), iterating from X0 (NULL: from 0, whose product
 * is skipped). `matmul` multiplies by Aᵀ.
 * Writes X and Z with X = φ(Z) exactly, Z = X_prev Aᵀ + C0 for the last
 * iterate X_prev (converged or not: for Anderson, X_prev is the last mixed
 * iterate, and X is the map's value there, not the mix). A sample stops
 * iterating as soon as its own residual is <= tol. */
idl_stats idl_fixed_point_f32(int64_t m, int64_t n, idl_matmul matmul_at,
                              const float *c0, const float *x0, idl_act act,
                              idl_solver solver, float *x, float *z,
                              void *workspace);
idl_stats idl_fixed_point_f64(int64_t m, int64_t n, idl_matmul matmul_at,
                              const double *c0, const double *x0, idl_act act,
                              idl_solver solver, double *x, double *z,
                              void *workspace);

/* Adjoint: V = φ'(Z) ⊙ (V A + G), iterating from V = 0. `matmul` multiplies
 * by A. This is dL/dZ at the fixed point for G = dL/dX. As in the forward
 * solve, V is the map's value at the last iterate, V = φ'(Z) ⊙ (V_prev A + G),
 * converged or not. */
idl_stats idl_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a,
                          const float *z, const float *g, idl_act act,
                          idl_solver solver, float *v, void *workspace);
idl_stats idl_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a,
                          const double *z, const double *g, idl_act act,
                          idl_solver solver, double *v, void *workspace);

/* Phantom adjoint (Geng et al. 2021): `steps` damped adjoint steps from V = 0,
 *     V <- (1 - tau) V + tau φ'(Z) ⊙ (V A + G),
 * an inexact dL/dZ (steps = 1, tau = 1 is Jacobian-free backprop, φ'(Z) ⊙ G).
 * stats: iterations = steps, residual = max |ΔV| of the last step, converged
 * = 1 (there is no test to meet). Workspace: idl_phantom_workspace_bytes. */
int64_t idl_phantom_workspace_bytes(int64_t m, int64_t n, int64_t elem_size);
idl_stats idl_phantom_adjoint_f32(int64_t m, int64_t n, idl_matmul matmul_a,
                                  const float *z, const float *g, idl_act act,
                                  int64_t steps, double tau, float *v,
                                  void *workspace);
idl_stats idl_phantom_adjoint_f64(int64_t m, int64_t n, idl_matmul matmul_a,
                                  const double *z, const double *g,
                                  idl_act act, int64_t steps, double tau,
                                  double *v, void *workspace);

/* out = left · M for the solves' small products (rows x n times n x n; left
 * and out contiguous, M row-major with row stride ldm), on the calling
 * thread: where a product has a few thousand multiply-adds, a BLAS call
 * through ATen costs several times the arithmetic (the glue's choice:
 * csrc/aten_matmul.h). */
void idl_small_matmul_f32(int64_t rows, int64_t n, const float *left,
                          const float *m, int64_t ldm, float *out);
void idl_small_matmul_f64(int64_t rows, int64_t n, const double *left,
                          const double *m, int64_t ldm, double *out);

/* ---- SIM: prox of l1 plus an l1-ball constraint (csrc/cpu/prox.c) ------- */

/* out (rows x cols, contiguous) = the prox of
 *     t_i * ||w||_1 + indicator(||w[:ball_cols]||_1 <= radius)
 * applied to each row w of `w` (row stride ldw), t_i = threshold[i *
 * threshold_stride] (stride 0: one threshold for all rows): every entry is
 * soft-thresholded by t_i, then the first `ball_cols` entries are projected
 * onto the l1 ball of `radius` (a radius of INFINITY, or ball_cols = 0, means
 * no ball). A row of w holding NaN or Inf comes out all NaN, so that the
 * solver calling the prox sees it. */
void idl_prox_l1_ball_f32(int64_t rows, int64_t cols, const float *w,
                          int64_t ldw, const float *threshold,
                          int64_t threshold_stride, double radius,
                          int64_t ball_cols, float *out);
void idl_prox_l1_ball_f64(int64_t rows, int64_t cols, const double *w,
                          int64_t ldw, const double *threshold,
                          int64_t threshold_stride, double radius,
                          int64_t ball_cols, double *out);

#ifdef __cplusplus
}
#endif

#endif /* IDL_H */
