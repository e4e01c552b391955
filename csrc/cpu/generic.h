/*
 * generic.h: the one trick that lets each kernel be written once for float and
 * double. A *.c file defines REAL (the element type) and SUFFIX (f32 or f64),
 * then includes a *.inc body; FN(name) names the function for that type.
 */
#ifndef IDL_GENERIC_H
#define IDL_GENERIC_H

#define IDL_CAT_(a, b) a##_##b
#define IDL_CAT(a, b) IDL_CAT_(a, b)
#define FN(name) IDL_CAT(name, SUFFIX)

#endif
