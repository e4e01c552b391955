// ops_cuda.cpp: the CUDA implementations of the idl:: ops (schemas in
// csrc/ops.cpp). Same checks as on CPU (csrc/checks.h), then a call to the CUDA
// kernels of csrc/cuda (declared in idl_cuda.h) on torch's current stream. No
// numerics live here.
//
// Under autocast (torch.autocast("cuda")) the solves run in float32: their
// float16/bfloat16 inputs are cast up (float64 ones are left alone, as autocast
// does), and the result is float32.
//
// The solves look at their convergence counters every IDL_CUDA_CHECK_EVERY
// iterations (environment variable, read at each call; default 8): smaller
// means fewer wasted passes after convergence, larger fewer host waits. 0
// never looks: max_iter passes, no host wait inside the solve.
//
// TF32: the GEMMs of a float32 solve run in full fp32 whatever torch's
// matmul precision says (torch.backends.cuda.matmul.allow_tf32,
// torch.set_float32_matmul_precision), because a fixed point iterated to a
// tolerance near fp32's precision does not converge with TF32's 10-bit
// mantissa; IDL_ALLOW_TF32=1 (read at each call) lets torch's setting apply.
// The switch is torch's process-wide one, set for the solve and put back
// after it: a float32 GEMM another thread runs meanwhile sees it too.
//
// Host syncs: idl::cuda_sync_counts() returns [solves, host waits, checks]
// counted since the process started (see idl_cuda_host), for benchmarks.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../aten_matmul.h"
#include "../checks.h"
#include "../prox_checks.h"
#include "idl_cuda.h"

namespace {

using namespace idl_checks;
using idl_glue::matmul_by_factor;
using idl_glue::RightFactor;

constexpr int64_t kDefaultCheckEvery = 8;

// ---- the CUDA kernels by element type --------------------------------------------

template <typename T>
struct CudaKernels;

template <>
struct CudaKernels<float> {
    static constexpr auto project = idl_cuda_project_linf_f32;
    static constexpr auto project_backward = idl_cuda_project_linf_backward_f32;
    static constexpr auto fixed_point = idl_cuda_fixed_point_f32;
    static constexpr auto adjoint = idl_cuda_adjoint_f32;
    static constexpr auto prox = idl_cuda_prox_l1_ball_f32;
    static constexpr auto phantom = idl_cuda_phantom_adjoint_f32;
};

template <>
struct CudaKernels<double> {
    static constexpr auto project = idl_cuda_project_linf_f64;
    static constexpr auto project_backward = idl_cuda_project_linf_backward_f64;
    static constexpr auto fixed_point = idl_cuda_fixed_point_f64;
    static constexpr auto adjoint = idl_cuda_adjoint_f64;
    static constexpr auto prox = idl_cuda_prox_l1_ball_f64;
    static constexpr auto phantom = idl_cuda_phantom_adjoint_f64;
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor bytes_like(int64_t bytes, const at::Tensor& like) {
    return at::empty({bytes}, like.options().dtype(at::kByte));
}

int64_t check_every() {
    const char* text = std::getenv("IDL_CUDA_CHECK_EVERY");
    if (text == nullptr || *text == '\0') return kDefaultCheckEvery;
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && value >= 0,
                      "idl: IDL_CUDA_CHECK_EVERY must be an integer >= 0, got '", text, "'");
    return value;
}

bool tf32_allowed() {
    const char* text = std::getenv("IDL_ALLOW_TF32");
    return text != nullptr && std::strcmp(text, "1") == 0;
}

// Full fp32 GEMMs for a float32 solve, unless IDL_ALLOW_TF32=1 (see the top
// of this file), for the guard's life. torch keeps this switch twice: the
// legacy matmul precision (set_float32_matmul_precision, allow_tf32), which
// sets both, and the per-backend fp32_precision, which sets only itself; a
// user of the latter leaves the two disagreeing, and the legacy getter then
// throws. So the legacy pair is used where it answers, the new one otherwise,
// and what was changed is put back.
class Fp32Gemms {
   public:
    explicit Fp32Gemms(at::ScalarType dtype) {
        if (dtype != at::kFloat || tf32_allowed()) return;
        auto& context = at::globalContext();
        try {
            const auto precision = context.float32MatmulPrecision();
            if (precision == at::Float32MatmulPrecision::HIGHEST) return;
            legacy_ = precision;
            context.setFloat32MatmulPrecision("highest");
        } catch (const c10::Error&) {
            const auto precision =
                context.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
            if (precision != at::Float32Precision::TF32) return;
            backend_ = precision;
            context.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL,
                                        at::Float32Precision::IEEE);
        }
    }
    ~Fp32Gemms() {
        auto& context = at::globalContext();
        if (legacy_)
            context.setFloat32MatmulPrecision(
                *legacy_ == at::Float32MatmulPrecision::HIGH ? "high" : "medium");
        else if (backend_)
            context.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL,
                                        *backend_);
    }
    Fp32Gemms(const Fp32Gemms&) = delete;
    Fp32Gemms& operator=(const Fp32Gemms&) = delete;

   private:
    std::optional<at::Float32MatmulPrecision> legacy_;  // set: restore the legacy switch
    std::optional<at::Float32Precision> backend_;       // set: restore the backend's one
};

// The counters behind idl::cuda_sync_counts.
std::atomic<int64_t> solves{0}, host_waits{0}, host_checks{0};

// The host side of one solve: pinned memory for its counters, from torch's
// caching host allocator (no cudaHostAlloc, which would synchronise the
// device, at every call). Kept alive by the caller until the solve returned.
struct HostSide {
    at::Tensor pinned;
    idl_cuda_host host;

    explicit HostSide(int64_t every)
        : pinned(every > 0 ? at::empty({IDL_CUDA_SNAPSHOT_BYTES},
                                       at::TensorOptions().dtype(at::kByte).pinned_memory(true))
                           : at::Tensor()),
          host{pinned.defined() ? pinned.data_ptr() : nullptr, 0, 0} {}

    ~HostSide() {
        ++solves;
        host_waits += host.waits;
        host_checks += host.checks;
    }
};

std::vector<int64_t> cuda_sync_counts() {
    return {solves.load(), host_waits.load(), host_checks.load()};
}

// ---- CUDA implementations ------------------------------------------------------

at::Tensor project_linf_cuda(const at::Tensor& A, double kappa, c10::string_view mode) {
    const auto how = check_project_args(A, kappa, mode);
    const c10::cuda::CUDAGuard guard(A.device());
    auto a = A.contiguous();
    auto out = at::empty_like(a);
    auto work = bytes_like(idl_cuda_project_workspace_bytes(a.size(0)), a);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf", [&] {
        C10_CUDA_CHECK(CudaKernels<scalar_t>::project(
            how, a.size(0), a.size(1), a.const_data_ptr<scalar_t>(), a.stride(0), kappa,
            out.data_ptr<scalar_t>(), work.data_ptr(), current_stream()));
    });
    return out;
}

at::Tensor project_linf_backward_cuda(const at::Tensor& grad, const at::Tensor& A, double kappa,
                                      c10::string_view mode) {
    const auto how = check_project_backward_args(grad, A, kappa, mode);
    const c10::cuda::CUDAGuard guard(A.device());
    auto a = A.contiguous();
    auto g = grad.contiguous();
    auto out = at::empty_like(a);
    auto work = bytes_like(idl_cuda_project_workspace_bytes(a.size(0)), a);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf_backward", [&] {
        C10_CUDA_CHECK(CudaKernels<scalar_t>::project_backward(
            how, a.size(0), a.size(1), a.const_data_ptr<scalar_t>(), a.stride(0), kappa,
            g.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), work.data_ptr(),
            current_stream()));
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cuda(const at::Tensor& A,
                                                         const at::Tensor& C0,
                                                         const c10::optional<at::Tensor>& X0,
                                                         const SolveArgs& args) {
    const c10::cuda::CUDAGuard guard(C0.device());
    auto c0 = C0.contiguous();
    // NaN/Inf in A or C0: looked for on the device, no host sync (idl_cuda.h)
    auto inputs_ok = (at::isfinite(A).all() & at::isfinite(c0).all()).to(at::kByte);
    auto x0 = X0.has_value() ? X0->contiguous() : at::Tensor();  // undefined: start at 0
    const int64_t m = c0.size(0), n = c0.size(1);
    auto x = at::empty_like(c0);
    auto z = at::empty_like(c0);
    auto stats = at::empty({3}, c0.options().dtype(at::kDouble));
    auto work = bytes_like(
        idl_cuda_solve_workspace_bytes(m, n, c0.element_size(), args.solver), c0);
    RightFactor at_factor{A.contiguous().t()};
    idl_matmul mm{matmul_by_factor, &at_factor};
    const int64_t every = check_every();
    HostSide side(every);
    const Fp32Gemms precision(c0.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(c0.scalar_type(), "idl::fixed_point", [&] {
        const cudaError_t status = CudaKernels<scalar_t>::fixed_point(
            m, n, mm, c0.const_data_ptr<scalar_t>(),
            x0.defined() ? x0.const_data_ptr<scalar_t>() : nullptr,
            inputs_ok.const_data_ptr<uint8_t>(), args.act, args.solver,
            every, x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
            stats.data_ptr<double>(), work.data_ptr(), &side.host, current_stream());
        at_factor.rethrow_error();  // IDL_CUDA_MATMUL_FAILED: the GEMM's own exception
        C10_CUDA_CHECK(status);
    });
    return {x, z, stats};
}

// Forward solve. grad_max_iter and grad_tol are only checked (see checks.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_cuda(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol,
    int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory) {
    return solve_cuda(A, C0, X0,
                      check_fixed_point_args(A, C0, X0, activation, slope, max_iter, tol,
                                             grad_max_iter, grad_tol, method, memory));
}

// Forward solve with a relative tolerance.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_rel_cuda(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol, double rtol,
    c10::string_view method, int64_t memory) {
    return solve_cuda(A, C0, X0,
                      check_fixed_point_rel_args(A, C0, X0, activation, slope, max_iter, tol,
                                                 rtol, method, memory));
}

std::tuple<at::Tensor, at::Tensor> adjoint_cuda(const at::Tensor& A, const at::Tensor& Z,
                                                const at::Tensor& G, const SolveArgs& args) {
    const c10::cuda::CUDAGuard guard(Z.device());
    auto z = Z.contiguous();
    auto g = G.contiguous();
    const int64_t m = z.size(0), n = z.size(1);
    auto v = at::empty_like(z);
    auto stats = at::empty({3}, z.options().dtype(at::kDouble));
    auto work = bytes_like(
        idl_cuda_solve_workspace_bytes(m, n, z.element_size(), args.solver), z);
    RightFactor a_factor{A.contiguous()};
    idl_matmul mm{matmul_by_factor, &a_factor};
    const int64_t every = check_every();
    HostSide side(every);
    const Fp32Gemms precision(z.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "idl::fixed_point_adjoint", [&] {
        const cudaError_t status = CudaKernels<scalar_t>::adjoint(
            m, n, mm, z.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), args.act,
            args.solver, every, v.data_ptr<scalar_t>(), stats.data_ptr<double>(),
            work.data_ptr(), &side.host, current_stream());
        a_factor.rethrow_error();  // IDL_CUDA_MATMUL_FAILED: the GEMM's own exception
        C10_CUDA_CHECK(status);
    });
    return {v, stats};
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_cuda(const at::Tensor& A,
                                                            const at::Tensor& Z,
                                                            const at::Tensor& G,
                                                            c10::string_view activation,
                                                            double slope, int64_t max_iter,
                                                            double tol, c10::string_view method,
                                                            int64_t memory) {
    return adjoint_cuda(A, Z, G,
                        check_adjoint_args(A, Z, G, activation, slope, max_iter, tol, method,
                                           memory));
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_rel_cuda(
    const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G, c10::string_view activation,
    double slope, int64_t max_iter, double tol, double rtol, c10::string_view method,
    int64_t memory) {
    return adjoint_cuda(A, Z, G,
                        check_adjoint_args(A, Z, G, activation, slope, max_iter, tol, method,
                                           memory, rtol));
}

// Phantom adjoint: `steps` damped adjoint steps (idl.h); steps 1, tau 1 is JFB.
std::tuple<at::Tensor, at::Tensor> phantom_adjoint_cuda(const at::Tensor& A, const at::Tensor& Z,
                                                        const at::Tensor& G,
                                                        c10::string_view activation,
                                                        double slope, int64_t steps, double tau) {
    const auto act = check_phantom_args(A, Z, G, activation, slope, steps, tau);
    const c10::cuda::CUDAGuard guard(Z.device());
    auto z = Z.contiguous();
    auto g = G.contiguous();
    const int64_t m = z.size(0), n = z.size(1);
    auto v = at::empty_like(z);
    auto stats = at::empty({3}, z.options().dtype(at::kDouble));
    auto work = bytes_like(idl_cuda_phantom_workspace_bytes(m, n, z.element_size()), z);
    RightFactor a_factor{A.contiguous()};
    idl_matmul mm{matmul_by_factor, &a_factor};
    const Fp32Gemms precision(z.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "idl::phantom_adjoint", [&] {
        const cudaError_t status = CudaKernels<scalar_t>::phantom(
            m, n, mm, z.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), act, steps,
            tau, v.data_ptr<scalar_t>(), stats.data_ptr<double>(), work.data_ptr(),
            current_stream());
        a_factor.rethrow_error();  // IDL_CUDA_MATMUL_FAILED: the GEMM's own exception
        C10_CUDA_CHECK(status);
    });
    return {v, stats};
}

// SIM's prox. The thresholds are checked in one look at the whole tensor (one
// host sync); the row named in the error is found only when one is bad.
at::Tensor prox_l1_ball_cuda(const at::Tensor& W, const at::Tensor& threshold, double radius,
                             int64_t ball_cols) {
    check_prox_args(W, threshold, radius, ball_cols);
    const c10::cuda::CUDAGuard guard(W.device());
    const auto bad = at::logical_not(at::isfinite(threshold) & threshold.ge(0));
    if (bad.any().item<bool>()) {
        const int64_t row = bad.nonzero()[0][0].item<int64_t>();
        check_prox_threshold(threshold[row].item<double>(), row);
    }
    auto w = W.stride(1) == 1 ? W : W.contiguous();
    auto out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "idl::prox_l1_ball", [&] {
        C10_CUDA_CHECK(CudaKernels<scalar_t>::prox(
            w.size(0), w.size(1), w.const_data_ptr<scalar_t>(), w.stride(0),
            threshold.const_data_ptr<scalar_t>(), threshold.stride(0), radius, ball_cols,
            out.data_ptr<scalar_t>(), current_stream()));
    });
    return out;
}

// ---- autocast: the solves in float32 ------------------------------------------------

template <typename T>
T to_float(const T& arg) {
    return at::autocast::cached_cast(at::kFloat, arg, c10::DeviceType::CUDA);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_autocast(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol,
    int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("idl::fixed_point", "")
                               .typed<decltype(fixed_point_cuda)>();
    return op.call(to_float(A), to_float(C0), to_float(X0), activation, slope, max_iter, tol,
                   grad_max_iter, grad_tol, method, memory);
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_autocast(
    const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G, c10::string_view activation,
    double slope, int64_t max_iter, double tol, c10::string_view method, int64_t memory) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("idl::fixed_point_adjoint", "")
                               .typed<decltype(fixed_point_adjoint_cuda)>();
    return op.call(to_float(A), to_float(Z), to_float(G), activation, slope, max_iter, tol, method,
                   memory);
}

}  // namespace

TORCH_LIBRARY_IMPL(idl, CUDA, m) {
    m.impl("project_linf", &project_linf_cuda);
    m.impl("project_linf_backward", &project_linf_backward_cuda);
    m.impl("fixed_point", &fixed_point_cuda);
    m.impl("fixed_point_adjoint", &fixed_point_adjoint_cuda);
    m.impl("fixed_point_rel", &fixed_point_rel_cuda);
    m.impl("fixed_point_adjoint_rel", &fixed_point_adjoint_rel_cuda);
    m.impl("phantom_adjoint", &phantom_adjoint_cuda);
    m.impl("prox_l1_ball", &prox_l1_ball_cuda);
}

TORCH_LIBRARY_FRAGMENT(idl, m) {
    m.def("cuda_sync_counts() -> int[]", &cuda_sync_counts);
}

TORCH_LIBRARY_IMPL(idl, AutocastCUDA, m) {
    m.impl("fixed_point", &fixed_point_autocast);
    m.impl("fixed_point_adjoint", &fixed_point_adjoint_autocast);
}
