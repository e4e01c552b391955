/* projection.c: projection of a matrix onto the inf-norm ball, and its
 * vector-Jacobian product. The body is projection.inc, once per type. */
#include <math.h>
#include <string.h>

#include "../idl.h"
#include "../idl_math.h"
#include "generic.h"

#define REAL float
#define SUFFIX f32
#include "l1_ball.inc"
#include "projection.inc"
#undef REAL
#undef SUFFIX

#define REAL double
#define SUFFIX f64
#include "l1_ball.inc"
#include "projection.inc"
#undef REAL
#undef SUFFIX
