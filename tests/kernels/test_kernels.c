/*
 * test_kernels.c: the C kernels of csrc/cpu on their own, without torch.
 *
 * Checks the projection, its vector-Jacobian product, the forward fixed-point
 * solve and the adjoint solve against naive references written here (a
 * sort-based projection, finite differences, whole-batch Picard loops), plus
 * edge cases: empty and 1x1 problems, zero-size buffers passed as NULL (as
 * torch does for tensors without elements), strided rows with NaN padding that
 * must never be read, huge and tiny magnitudes, NaN/Inf input, iteration
 * limits. Built plainly and under AddressSanitizer + UBSan, and run under
 * valgrind memcheck (tests/kernels/Makefile, tests/test_sanitizers.py).
 *
 * Exit status 0 when every check passes; each failure is printed.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "idl.h"
#include "cpu/generic.h" /* FN(name): the name for the REAL type at hand */

/* Solver settings: Picard, or Anderson with the memory and ridge the
 * library's glue uses (csrc/checks.h). */
#define PICARD(max_iter, tol) ((idl_solver){IDL_PICARD, (max_iter), (tol), 0, 0.0, 0.0, 0.0, 0})
#define ANDERSON(max_iter, tol) ((idl_solver){IDL_ANDERSON, (max_iter), (tol), 5, 1e-10, 0.0, 0.0, 0})

#define STR_(x) #x
#define STR(x) STR_(x)

/* ---- checks ----------------------------------------------------------------- */

static int checks_run = 0;
static int checks_failed = 0;

#define CHECK(cond, ...)                                           \
    do {                                                           \
        ++checks_run;                                              \
        if (!(cond)) {                                             \
            ++checks_failed;                                       \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
            fprintf(stderr, __VA_ARGS__);                          \
            fprintf(stderr, "\n");                                 \
        }                                                          \
    } while (0)

/* |got - want| <= atol + rtol |want|, NaN equal to NaN. */
static int close_to(double got, double want, double atol, double rtol)
{
    if (isnan(want))
        return isnan(got);
    if (isinf(want))
        return got == want;
    return fabs(got - want) <= atol + rtol * fabs(want);
}

/* ---- deterministic random numbers (xorshift64*) -------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform01(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

static double normalish(void) /* sum of uniforms: enough for test data */
{
    return (uniform01() + uniform01() + uniform01() - 1.5) * 2.0;
}

/* malloc that returns NULL for zero bytes, as torch's data_ptr of an empty
 * tensor: a kernel must not touch a zero-size buffer. */
static void *alloc(size_t count, size_t size)
{
    if (count == 0)
        return NULL;
    void *p = calloc(count, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ---- naive references, all in double --------------------------------------- */

static int by_decreasing(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* Euclidean projection of one row onto the l1 ball, by sorting (Duchi et al.
 * 2008): theta = (sum of the rho largest |a| - kappa) / rho, with rho the
 * largest k whose k-th largest |a| exceeds (its partial sum - kappa) / k. */
static void ref_project_row(int64_t n, const double *a, double kappa, double *out)
{
    double l1 = 0.0;
    for (int64_t j = 0; j < n; ++j)
        l1 += fabs(a[j]);
    if (l1 <= kappa) {
        for (int64_t j = 0; j < n; ++j)
            out[j] = a[j];
        return;
    }
    double *sorted = alloc((size_t)n, sizeof(double));
    for (int64_t j = 0; j < n; ++j)
        sorted[j] = fabs(a[j]);
    qsort(sorted, (size_t)n, sizeof(double), by_decreasing);
    double partial = 0.0, theta = 0.0;
    for (int64_t k = 0; k < n; ++k) {
        partial += sorted[k];
        double candidate = (partial - kappa) / (double)(k + 1);
        if (sorted[k] > candidate)
            theta = candidate;
    }
    free(sorted);
    for (int64_t j = 0; j < n; ++j)
        out[j] = copysign(fmax(fabs(a[j]) - theta, 0.0), a[j]);
}

static void ref_project(idl_projection mode, int64_t rows, int64_t cols,
                        const double *a, double kappa, double *out)
{
    if (mode == IDL_PROJECT_EXACT) {
        for (int64_t i = 0; i < rows; ++i)
            ref_project_row(cols, a + i * cols, kappa, out + i * cols);
        return;
    }
    double norm = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
        double l1 = 0.0;
        for (int64_t j = 0; j < cols; ++j)
            l1 += fabs(a[i * cols + j]);
        norm = fmax(norm, l1);
    }
    for (int64_t k = 0; k < rows * cols; ++k)
        out[k] = norm > kappa ? a[k] * (kappa / norm) : a[k];
}

static double ref_phi(idl_act act, double z)
{
    switch (act.kind) {
    case IDL_RELU: return z > 0 ? z : 0;
    case IDL_LEAKY_RELU: return z > 0 ? z : act.param * z;
    case IDL_TANH: return tanh(z);
    case IDL_HARDTANH: return fmin(1.0, fmax(-1.0, z));
    case IDL_SIGMOID: return 1.0 / (1.0 + exp(-z));
    case IDL_SOFTPLUS: return log(1.0 + exp(z));
    case IDL_IDENTITY: return z;
    }
    return NAN;
}

/* φ' from the textbook formulas, with torch's values at the kinks. */
static double ref_dphi(idl_act act, double z)
{
    switch (act.kind) {
    case IDL_RELU: return z > 0 ? 1 : 0;
    case IDL_LEAKY_RELU: return z > 0 ? 1 : act.param;
    case IDL_TANH: return 1.0 / (cosh(z) * cosh(z));
    case IDL_HARDTANH: return fabs(z) < 1 ? 1 : 0;
    case IDL_SIGMOID: {
        const double e = exp(-fabs(z));
        return e / ((1 + e) * (1 + e));
    }
    case IDL_SOFTPLUS: return 1.0 / (1.0 + exp(-z));
    case IDL_IDENTITY: return 1;
    }
    return NAN;
}

static double largest_magnitude(int64_t count, const double *values)
{
    double largest = 0.0;
    for (int64_t k = 0; k < count; ++k)
        largest = fmax(largest, fabs(values[k]));
    return largest;
}

/* Whole-batch Picard: X = φ(X Aᵀ + C0) from 0, to a tight relative
 * tolerance. */
static void ref_fixed_point(int64_t m, int64_t n, const double *A, const double *c0,
                            idl_act act, double *x)
{
    double *next = alloc((size_t)(m * n), sizeof(double));
    memset(x, 0, (size_t)(m * n) * sizeof(double));
    for (int iteration = 0; iteration < 100000; ++iteration) {
        double delta = 0.0;
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
                double z = c0[i * n + j];
                for (int64_t k = 0; k < n; ++k)
                    z += x[i * n + k] * A[j * n + k];
                next[i * n + j] = ref_phi(act, z);
                delta = fmax(delta, fabs(next[i * n + j] - x[i * n + j]));
            }
        memcpy(x, next, (size_t)(m * n) * sizeof(double));
        if (delta <= 1e-15 * (1 + largest_magnitude(m * n, x)))
            break;
    }
    free(next);
}

/* Whole-batch adjoint: V = d ⊙ (V A + G) from 0, likewise. */
static void ref_adjoint(int64_t m, int64_t n, const double *A, const double *d,
                        const double *g, double *v)
{
    double *next = alloc((size_t)(m * n), sizeof(double));
    memset(v, 0, (size_t)(m * n) * sizeof(double));
    for (int iteration = 0; iteration < 100000; ++iteration) {
        double delta = 0.0;
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
                double p = g[i * n + j];
                for (int64_t k = 0; k < n; ++k)
                    p += v[i * n + k] * A[k * n + j];
                next[i * n + j] = d[i * n + j] * p;
                delta = fmax(delta, fabs(next[i * n + j] - v[i * n + j]));
            }
        memcpy(v, next, (size_t)(m * n) * sizeof(double));
        if (delta <= 1e-15 * (1 + largest_magnitude(m * n, v)))
            break;
    }
    free(next);
}

/* A random n x n matrix with ||A||_inf = kappa exactly in every row (the
 * hardest well-posed case for the solves). */
static void random_contraction(int64_t n, double kappa, double *A)
{
    for (int64_t i = 0; i < n; ++i) {
        double l1 = 0.0;
        for (int64_t j = 0; j < n; ++j) {
            A[i * n + j] = normalish();
            l1 += fabs(A[i * n + j]);
        }
        for (int64_t j = 0; j < n; ++j)
            A[i * n + j] *= kappa / l1;
    }
}

/* Written into output buffers before a solve: a value the kernel forgot to
 * write stays at it. */
static const double SENTINEL = 12345.0;

static const idl_act ACTIVATIONS[] = {
    {IDL_IDENTITY, 0.0}, {IDL_RELU, 0.0},    {IDL_LEAKY_RELU, 0.1}, {IDL_TANH, 0.0},
    {IDL_HARDTANH, 0.0}, {IDL_SIGMOID, 0.0}, {IDL_SOFTPLUS, 0.0},
};
#define N_ACTIVATIONS (sizeof ACTIVATIONS / sizeof ACTIVATIONS[0])

/* A group of checks, selectable from the command line. */
typedef struct {
    const char *name;
    void (*run)(void);
} test_group;

/* ---- the tests, once per element type ----------------------------------- */

#define REAL float
#define SUFFIX f32
#define EPS 1e-5        /* tolerance of results */
#define ROUND FLT_EPSILON
#define SOLVE_TOL 1e-6  /* a residual the type can reach */
#define HUGE_VALUE 1e30
#define TINY_VALUE 1e-38
#include "kernel_tests.inc"
#undef REAL
#undef SUFFIX
#undef EPS
#undef ROUND
#undef SOLVE_TOL
#undef HUGE_VALUE
#undef TINY_VALUE

#define REAL double
#define SUFFIX f64
#define EPS 1e-12
#define ROUND DBL_EPSILON
#define SOLVE_TOL 1e-14
#define HUGE_VALUE 1e250
#define TINY_VALUE 1e-300
#include "kernel_tests.inc"
#undef REAL
#undef SUFFIX
#undef EPS
#undef ROUND
#undef SOLVE_TOL
#undef HUGE_VALUE
#undef TINY_VALUE

/* Usage: test_kernels [GROUP...]; no GROUP runs them all. */
int main(int argc, char **argv)
{
    const size_t groups = sizeof tests_f64 / sizeof tests_f64[0];
    for (int arg = 1; arg < argc; ++arg) {
        size_t g = 0;
        while (g < groups && strcmp(argv[arg], tests_f64[g].name) != 0)
            ++g;
        if (g == groups) {
            fprintf(stderr, "unknown test group '%s'; the groups are:", argv[arg]);
            for (g = 0; g < groups; ++g)
                fprintf(stderr, " %s", tests_f64[g].name);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    for (size_t g = 0; g < groups; ++g) {
        int selected = argc == 1;
        for (int arg = 1; arg < argc; ++arg)
            selected = selected || strcmp(argv[arg], tests_f64[g].name) == 0;
        if (selected) {
            tests_f32[g].run();
            tests_f64[g].run();
        }
    }
    printf("%d checks, %d failed\n", checks_run, checks_failed);
    return checks_failed == 0 ? 0 : 1;
}
