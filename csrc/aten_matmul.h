// aten_matmul.h: the GEMM of the solver loops (idl_matmul in idl.h) through
// ATen, shared by the CPU and CUDA glue. On CUDA, ATen runs it with cuBLAS on
// the current stream.
#ifndef IDL_ATEN_MATMUL_H
#define IDL_ATEN_MATMUL_H

#include <ATen/ATen.h>

#include <exception>
#include <utility>

#include "idl.h"

namespace idl_glue {

// The fixed right factor of a solve's products: out = left · matrix.
struct RightFactor {
    explicit RightFactor(at::Tensor matrix_) : matrix(std::move(matrix_)) {}

    at::Tensor matrix;  // n x n, possibly a transposed view
    // What the GEMM threw: it must not unwind through the C solve, so it is
    // kept here, the solve stops, and the glue rethrows it (rethrow_error).
    std::exception_ptr error;

    void rethrow_error() const {
        if (error) std::rethrow_exception(error);
    }
};

// idl_matmul_fn for a RightFactor: `left` and `out` are rows x n, contiguous,
// in memory of the matrix's device and dtype. Returns 1 when it threw.
inline int matmul_by_factor(void* ctx, int64_t rows, const void* left, void* out) noexcept {
    auto* factor = static_cast<RightFactor*>(ctx);
    try {
        const auto& m = factor->matrix;
        const int64_t n = m.size(0);
        // The device given, so that wrapping the pointers does not ask the
        // driver where they live (a pointer-attribute query) at every pass.
        auto wrap = [&](void* data) {
            return at::for_blob(data, {rows, n}).options(m.options()).target_device(m.device())
                .make_tensor();
        };
        auto out_t = wrap(out);
        at::mm_out(out_t, wrap(const_cast<void*>(left)), m);
        return 0;
    } catch (...) {
        factor->error = std::current_exception();
        return 1;
    }
}

}  // namespace idl_glue

#endif  // IDL_ATEN_MATMUL_H
