/* fixed_point.c: the forward and adjoint fixed-point solves (Picard or
 * Anderson), with the built-in activations. The type-generic bodies are in
 * activation.inc, anderson.inc and fixed_point.inc, included once per type. */
#include <math.h>
#include <string.h>
#include <tgmath.h> /* exp, tanh, fabs ... at the precision of REAL */

#include "../idl.h"
#include "../idl_math.h"
#include "generic.h"

/* Elements below which a pass over the working rows stays on one thread. */
#define IDL_PARALLEL_MIN_WORK 8192

int64_t idl_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size,
                                  idl_solver solver)
{
    const int64_t M = idl_anderson_memory(solver);
    const int64_t doubles = m * M * M + 3 * m;  /* Gram, residuals, thresholds */
    const int64_t ints = 6 * m; /* idx, g_in_x, count, next, restarts, slow */
    const int64_t reals = 3 * m * n                  /* xw, p, aux          */
                          + (M > 0 ? m * n : 0)      /* gxw                 */
                          + 2 * m * M * n;           /* f, g histories      */
    return doubles * (int64_t)sizeof(double) + ints * (int64_t)sizeof(int64_t) +
           reals * elem_size;
}

int64_t idl_phantom_workspace_bytes(int64_t m, int64_t n, int64_t elem_size)
{
    return 2 * m * n * elem_size; /* φ'(Z), the product V A */
}

#define REAL float
#define SUFFIX f32
#include "activation.inc"
#include "anderson.inc"
#include "fixed_point.inc"
#undef IDL_ROW_PASS
#undef REAL
#undef SUFFIX

#define REAL double
#define SUFFIX f64
#include "activation.inc"
#include "anderson.inc"
#include "fixed_point.inc"
#undef IDL_ROW_PASS
#undef REAL
#undef SUFFIX
