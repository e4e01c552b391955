/*
 * idl_math.h: the scalar math shared by the C kernels (csrc/cpu) and the CUDA
 * kernels (csrc/cuda), so that both compute the same thing by the same
 * formula: the built-in activations and their derivatives, and the pieces of
 * the l1-ball projection (its threshold step, its per-entry result and VJP
 * entry) and of SIM's prox.
 *
 * Static inline functions, valid C11 and CUDA C++: IDL_HD marks them
 * __host__ __device__ under nvcc and is empty in C. The activations come once
 * per element type, with a _f32 or _f64 suffix (idl_math_real.inc, included
 * twice below); C++ gets overloads without the suffix. The l1-ball pieces
 * work in double for both types.
 */
#ifndef IDL_MATH_H
#define IDL_MATH_H

#include <math.h>

#include "idl.h"

#ifdef __CUDACC__
#define IDL_HD __host__ __device__
#else
#define IDL_HD
#endif

/* ---- activations: φ(z) and φ'(z) per type ------------------------------- */

/* IDL_MATH(fn) is the libm function fn at the precision of IDL_MATH_REAL: the
 * float versions (tanhf ...) exist in C, in C++ and on the device alike. */
#define IDL_MATH_REAL float
#define IDL_MATH_SUFFIX f32
#define IDL_MATH(fn) fn##f
#include "idl_math_real.inc"
#undef IDL_MATH_REAL
#undef IDL_MATH_SUFFIX
#undef IDL_MATH

#define IDL_MATH_REAL double
#define IDL_MATH_SUFFIX f64
#define IDL_MATH(fn) fn
#include "idl_math_real.inc"
#undef IDL_MATH_REAL
#undef IDL_MATH_SUFFIX
#undef IDL_MATH

#ifdef __cplusplus
/* The CUDA kernels are templates over the element type. */
IDL_HD static inline float idl_phi_at(idl_act act, float z) { return idl_phi_at_f32(act, z); }
IDL_HD static inline double idl_phi_at(idl_act act, double z) { return idl_phi_at_f64(act, z); }
IDL_HD static inline float idl_dphi_at(idl_act act, float z) { return idl_dphi_at_f32(act, z); }
IDL_HD static inline double idl_dphi_at(idl_act act, double z) { return idl_dphi_at_f64(act, z); }
#endif

/* ---- the exact projection of a row onto the l1 ball ----------------------
 *
 * The projection of a row a onto {||x||_1 <= radius}, for a row outside, is
 * a soft-threshold a_j -> sign(a_j) max(|a_j| - theta, 0). Computed as such it
 * loses the radius when ||a||_1 / radius is huge: theta rounds up to max|a_j|
 * and the row becomes all zeros (e.g. [1e20, 1e20] onto radius 1). So every
 * magnitude is written as |a_j| = top - gap_j, top = max|a_j| and gap_j >= 0,
 * and theta as top - delta: with S = {j : gap_j < delta} (the support),
 *
 *     delta = (sum of gap_j over S + radius) / |S|,
 *
 * and a member of S shrinks to delta - gap_j, a difference of small numbers
 * where |a_j| - theta would cancel. delta comes from Michelot's iteration:
 * start with S = every entry, compute delta, take S = {gap_j < delta}, repeat
 * until S stops changing. delta only decreases (each one is an upper bound of
 * the true one, the min below keeps rounding from raising one), so S only
 * shrinks and a pass that keeps its size has kept S itself.
 *
 * Gaps are in units of `unit`, 1 except for rows whose top exceeds 2^960,
 * where the gaps' sum could overflow; 2^-64 then loses nothing (a nonzero gap
 * is then above 2^900) unless the radius is below 1e-289. */
typedef struct {
    double top;       /* max |a_j| of the row                 */
    double unit;      /* gaps and delta are in units of this  */
    double per_unit;  /* 1 / unit, a power of two             */
    double radius;    /* the radius, in units of `unit`       */
    double delta;     /* the current delta, in units          */
    double count;     /* |S| of the last pass, -1 before one  */
} idl_l1_cut;

/* Rows the exact projection leaves as they are: those inside the ball, and
 * those holding NaN or Inf (`finite` = 0), which reach the solve, which stops
 * and reports them, rather than being thresholded into something finite and
 * wrong. */
IDL_HD static inline int idl_l1_row_kept(double l1, double radius, int finite)
{
    return !(l1 > radius) || !finite;
}

/* The iteration's start for a row with max |a_j| = top (finite), outside the
 * ball: delta = Inf puts every entry in S. */
IDL_HD static inline idl_l1_cut idl_l1_cut_start(double top, double radius)
{
    idl_l1_cut cut;
    cut.top = top;
    cut.unit = top > 0x1p960 ? 0x1p-64 : 1.0;
    cut.per_unit = top > 0x1p960 ? 0x1p64 : 1.0;
    cut.radius = radius * cut.unit;
    cut.delta = INFINITY;
    cut.count = -1.0;
    return cut;
}

/* gap_j of an entry, in units (the cut's top and unit). The entry-level
 * pieces take scalars, not the cut, so that the CPU loops calling them stay
 * plain vectorisable passes. */
IDL_HD static inline double idl_l1_gap(double top, double unit, double entry)
{
    return (top - fabs(entry)) * unit;
}

/* Whether an entry of that gap is in S (below the cut's delta): 1 or 0, as a
 * double, a mask that multiplies (returned as an int, GCC keeps the CPU's
 * passes scalar). */
IDL_HD static inline double idl_l1_member(double gap, double delta)
{
    return (double)(gap < delta);
}

/* The threshold step: a pass found `count` members of S whose gaps sum to
 * `gap_sum`. Returns 0 when delta is final (S is the set of the previous
 * pass, or empty: then delta <= 0 and nothing is kept), else takes the next
 * delta and returns 1. */
IDL_HD static inline int idl_l1_step(idl_l1_cut *cut, double gap_sum, double count)
{
    if (count == cut->count || count == 0.0)
        return 0;
    cut->count = count;
    /* theta >= 0 outside the ball, so delta <= top: capped there, rounding
     * cannot let zero entries (gap = top) into S */
    const double cap = cut->top * cut->unit;
    double next = (gap_sum + cut->radius) / count;
    next = next < cap ? next : cap;
    cut->delta = next < cut->delta ? next : cut->delta;
    return 1;
}

/* The projected value of an entry of that gap, once delta is final
 * (per_unit: the cut's). */
IDL_HD static inline double idl_l1_project_entry(double entry, double gap, double delta,
                                                 double per_unit)
{
    return idl_l1_member(gap, delta) != 0.0 ? copysign((delta - gap) * per_unit, entry) : 0.0;
}

/* The Jacobian of a projected row is diag(1_S) - s_S s_S^T / |S|, s = sign(a);
 * it is symmetric, so the VJP applies it to the gradient: with `mean` the
 * mean over S of s_j grad_j (idl_l1_signed summed, over |S|), entry j of the
 * VJP is idl_l1_vjp_entry. */
IDL_HD static inline double idl_l1_signed(double entry, double grad)
{
    return copysign(1.0, entry) * grad; /* no branch: the CPU's VJP passes vectorise */
}

IDL_HD static inline double idl_l1_vjp_entry(double member, double entry, double grad,
                                             double mean)
{
    return member != 0.0 ? grad - idl_l1_signed(entry, mean) : 0.0;
}

/* ---- SIM's prox ------------------------------------------------------------ */

/* The prox of t |w|: w soft-thresholded by t >= 0. */
IDL_HD static inline double idl_soft_threshold(double w, double t)
{
    const double shrunk = fabs(w) - t;
    return shrunk > 0.0 ? copysign(shrunk, w) : 0.0;
}

/* ---- Anderson mixing ------------------------------------------------------- */

/* Solves the k x k system (row-major, overwritten) for the right-hand side in
 * `weights` by Gaussian elimination with partial pivoting, then scales the
 * solution to sum to 1: the affine weights of Anderson mixing (see
 * csrc/cpu/anderson.inc). Returns 0, leaving garbage, when the system or the
 * sum is degenerate. k <= IDL_ANDERSON_MAX_MEMORY, so this is a handful of
 * flops per iteration and sample, done by one thread on the device. */
IDL_HD static inline int idl_affine_weights(int64_t k, double *system, double *weights)
{
    for (int64_t col = 0; col < k; ++col) {
        int64_t pivot = col;
        for (int64_t row = col + 1; row < k; ++row)
            if (fabs(system[row * k + col]) > fabs(system[pivot * k + col]))
                pivot = row;
        if (!(fabs(system[pivot * k + col]) > 0.0))
            return 0;
        if (pivot != col) {
            for (int64_t j = 0; j < k; ++j) {
                const double t = system[col * k + j];
                system[col * k + j] = system[pivot * k + j];
                system[pivot * k + j] = t;
            }
            const double t = weights[col];
            weights[col] = weights[pivot];
            weights[pivot] = t;
        }
        for (int64_t row = col + 1; row < k; ++row) {
            const double factor = system[row * k + col] / system[col * k + col];
            for (int64_t j = col; j < k; ++j)
                system[row * k + j] -= factor * system[col * k + j];
            weights[row] -= factor * weights[col];
        }
    }
    double sum = 0.0;
    for (int64_t row = k - 1; row >= 0; --row) {
        double acc = weights[row];
        for (int64_t j = row + 1; j < k; ++j)
            acc -= system[row * k + j] * weights[j];
        weights[row] = acc / system[row * k + row];
        sum += weights[row];
    }
    if (!(fabs(sum) > 1e-300) || !isfinite(sum))
        return 0;
    for (int64_t i = 0; i < k; ++i)
        weights[i] /= sum;
    return 1;
}

#endif /* IDL_MATH_H */
