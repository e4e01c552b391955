/* prox.c: the proximal operator of l1 plus an l1-ball constraint, row by row,
 * for SIM's batched solvers. The body is prox.inc, once per type. */
#include <math.h>

#include "../idl.h"
#include "../idl_math.h"
#include "generic.h"

#define REAL float
#define SUFFIX f32
#include "l1_ball.inc"
#include "prox.inc"
#undef REAL
#undef SUFFIX

#define REAL double
#define SUFFIX f64
#include "l1_ball.inc"
#include "prox.inc"
#undef REAL
#undef SUFFIX
