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

    at::Tensor matrix;     // n x n, possibly a transposed view
    at::Tensor row_major;  // the matrix with unit column stride, made at the
                           // first small product (small_matmul)
    // What the GEMM threw: it must not unwind through the C solve, so it is
    // kept here, the solve stops, and the glue rethrows it (rethrow_error).
    std::exception_ptr error;

    void rethrow_error() const {
        if (error) std::rethrow_exception(error);
    }
};

// Multiply-adds up to which a CPU product is idl_small_matmul's, not ATen's.
// Measured per solve iteration (one thread, noisy): ATen's call (dispatch,
// two tensor wraps, MKL) costs ~1.5-2 us whatever the size, the loop ~0.3 ns
// a multiply-add; they cross between 4,000 and 8,000 (hidden 10 x 80 rows
// was slower in C). An ImplicitRNN step of hidden 10 made ~400 products of
// 3,200.
constexpr int64_t kSmallMatmulWork = int64_t{1} << 12;

inline bool small_matmul(RightFactor& factor, int64_t rows, const void* left, void* out) {
    const auto& m = factor.matrix;
    const int64_t n = m.size(0);
    if (!m.device().is_cpu() || rows * n * n > kSmallMatmulWork) return false;
    if (!factor.row_major.defined())  // Aᵀ of the forward solve: one copy of n x n
        factor.row_major = m.stride(1) == 1 ? m : m.contiguous();
    const auto& dense = factor.row_major;
    if (dense.scalar_type() == at::kFloat)
        idl_small_matmul_f32(rows, n, static_cast<const float*>(left), dense.const_data_ptr<float>(),
                             dense.stride(0), static_cast<float*>(out));
    else
        idl_small_matmul_f64(rows, n, static_cast<const double*>(left),
                             dense.const_data_ptr<double>(), dense.stride(0),
                             static_cast<double*>(out));
    return true;
}

// idl_matmul_fn for a RightFactor: `left` and `out` are rows x n, contiguous,
// in memory of the matrix's device and dtype (float or double on the CPU).
// Returns 1 when it threw.
inline int matmul_by_factor(void* ctx, int64_t rows, const void* left, void* out) noexcept {
    auto* factor = static_cast<RightFactor*>(ctx);
    try {
        const auto& m = factor->matrix;
        if (small_matmul(*factor, rows, left, out)) return 0;
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
