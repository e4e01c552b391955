/* fixed_point.c: the forward and adjoint fixed-point solves, with the built-in
 * activations. The body is fixed_point.inc, once per type. */
#include <math.h>
#include <string.h>
#include <tgmath.h> /* exp, tanh, fabs ... at the precision of REAL */

#include "../idl.h"
#include "generic.h"

int64_t idl_solve_workspace_bytes(int64_t m, int64_t n, int64_t elem_size)
{
    return 3 * m * n * elem_size + m * (int64_t)sizeof(int64_t);
}

#define REAL float
#define SUFFIX f32
#include "fixed_point.inc"
#undef REAL
#undef SUFFIX

#define REAL double
#define SUFFIX f64
#include "fixed_point.inc"
#undef REAL
#undef SUFFIX
