// aten_matmul.h: the GEMM of the solver loops (idl_matmul in idl.h) through
// ATen, shared by the CPU and CUDA glue. On CUDA, ATen runs it with cuBLAS on
// the current stream.
#ifndef IDL_ATEN_MATMUL_H
#define IDL_ATEN_MATMUL_H

#include <ATen/ATen.h>

#include "idl.h"

namespace idl_glue {

// The fixed right factor of a solve's products: out = left · matrix.
struct RightFactor {
    at::Tensor matrix;  // n x n, possibly a transposed view
};

// idl_matmul_fn for a RightFactor: `left` and `out` are rows x n, contiguous,
// in memory of the matrix's device and dtype.
inline void matmul_by_factor(void* ctx, int64_t rows, const void* left, void* out) {
    const auto& m = static_cast<RightFactor*>(ctx)->matrix;
    const int64_t n = m.size(0);
    auto opts = m.options();
    auto left_t = at::from_blob(const_cast<void*>(left), {rows, n}, opts);
    auto out_t = at::from_blob(out, {rows, n}, opts);
    at::mm_out(out_t, left_t, m);
}

}  // namespace idl_glue

#endif  // IDL_ATEN_MATMUL_H
