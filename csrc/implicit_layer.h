// implicit_layer.h: the pieces of idl::implicit_layer (csrc/implicit_layer.cpp)
// that idl::implicit_rnn (csrc/implicit_rnn.cpp) shares: the layer's settings
// and their checks, the well-posed A and its backward, the other idl:: ops
// called through the dispatcher, the stats row helpers, the report of a
// solve that did not converge, the adjoint (implicit differentiation) and how
// the settings ride in an autograd context.
#ifndef IDL_IMPLICIT_LAYER_H
#define IDL_IMPLICIT_LAYER_H

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "serial_blas.h"

namespace idl_layer {

using idl_checks::check_matrix;
using idl_checks::check_same;
using idl_glue::kSerialBlasMaxWork;
using idl_glue::SerialBlasIfSmall;
using torch::autograd::AutogradContext;
using OptTensor = c10::optional<at::Tensor>;

// ---- the other idl:: ops, called through the dispatcher ---------------------

template <typename Signature>
inline c10::TypedOperatorHandle<Signature> idl_op(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor project_linf(const at::Tensor& A, double kappa, const std::string& mode) {
    static const auto op =
        idl_op<at::Tensor(const at::Tensor&, double, c10::string_view)>("idl::project_linf");
    return op.call(A, kappa, mode);
}

inline at::Tensor project_linf_backward(const at::Tensor& grad, const at::Tensor& A, double kappa,
                                        const std::string& mode) {
    static const auto op =
        idl_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view)>(
            "idl::project_linf_backward");
    return op.call(grad, A, kappa, mode);
}

using SolveSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double, int64_t,
    double, int64_t, double, c10::string_view, int64_t);
using AdjointSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double, int64_t,
    double, c10::string_view, int64_t);
using SolveRelSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double, int64_t,
    double, double, c10::string_view, int64_t);
using AdjointRelSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double, int64_t,
    double, double, c10::string_view, int64_t);
using PhantomSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double, int64_t,
    double);

// ---- the layer's settings ------------------------------------------------------

// The non-tensor arguments of idl::implicit_layer, in schema order.
struct Settings {
    std::string well_posed;  // "none", "triu", or a projection mode ("exact", "scale")
    double kappa;
    std::string activation;
    double slope;
    int64_t max_iter;
    double tol;
    int64_t grad_max_iter;
    double grad_tol;
    std::string method;
    int64_t memory;
    double rtol = 0.0;
    double grad_rtol = 0.0;
    std::string backward = "implicit";  // "implicit", "phantom" or "jfb"
    int64_t phantom_steps = 5;
    double phantom_tau = 0.5;
    std::string on_nonconvergence = "warn";  // what a solve that did not converge does
    double d_scale = 1.0;                    // the skip path applies d_scale · D
};

// The settings idl::fixed_point and idl::fixed_point_adjoint (every device)
// cannot express: a relative tolerance, or method "auto". Those solves go to
// the *_rel ops.
inline bool forward_needs_rel(const Settings& s) { return s.rtol != 0.0 || s.method == "auto"; }
inline bool backward_needs_rel(const Settings& s) { return s.grad_rtol != 0.0 || s.method == "auto"; }

inline void check_settings(const Settings& s) {
    TORCH_CHECK_VALUE(s.backward == "implicit" || s.backward == "phantom" || s.backward == "jfb",
                      "idl: backward must be 'implicit', 'phantom' or 'jfb', got '", s.backward,
                      "'");
    idl_checks::check_phantom(s.phantom_steps, s.phantom_tau);
    TORCH_CHECK_VALUE(s.rtol >= 0.0 && std::isfinite(s.rtol),
                      "idl: rtol must be a finite number >= 0, got ", s.rtol);
    TORCH_CHECK_VALUE(s.grad_rtol >= 0.0 && std::isfinite(s.grad_rtol),
                      "idl: grad_rtol must be a finite number >= 0, got ", s.grad_rtol);
    TORCH_CHECK_VALUE(std::isfinite(s.d_scale), "idl: d_scale must be finite, got ", s.d_scale);
    TORCH_CHECK_VALUE(s.on_nonconvergence == "warn" || s.on_nonconvergence == "raise",
                      "idl: on_nonconvergence must be 'warn' or 'raise', got '",
                      s.on_nonconvergence, "'");
    TORCH_CHECK_VALUE(s.well_posed == "none" || s.well_posed == "triu" ||
                          s.well_posed == "exact" || s.well_posed == "scale",
                      "idl: well_posed must be 'none', 'triu', 'exact' or 'scale', got '",
                      s.well_posed, "'");
}

inline bool is_projection(const Settings& s) { return s.well_posed == "exact" || s.well_posed == "scale"; }

// The matrix the solves use in place of the parameter A.
inline at::Tensor well_posed(const at::Tensor& A, const Settings& s) {
    if (s.well_posed == "triu") return at::triu(A, 1);
    if (is_projection(s)) return project_linf(A, s.kappa, s.well_posed);
    return A;
}

// dL/dA from dL/dĀ: the transpose of well_posed's Jacobian.
inline at::Tensor well_posed_backward(const at::Tensor& grad, const at::Tensor& A, const Settings& s) {
    if (s.well_posed == "triu") return at::triu(grad, 1);
    if (is_projection(s)) return project_linf_backward(grad, A, s.kappa, s.well_posed);
    return grad;
}

// The ops a layer's settings need beyond idl::fixed_point and
// idl::fixed_point_adjoint must have a kernel on its device (CPU and CUDA
// have them all): a device without one is refused at the forward call, with
// a clear message, rather than in the backward pass with the dispatcher's.
inline void check_device_supports(const Settings& s, const at::Tensor& like) {
    if (like.device().is_cpu() || like.device().is_meta()) return;
    const auto key = c10::computeDispatchKey(std::nullopt, like.layout(), like.device());
    auto has = [&](const char* name) {
        return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").hasKernelForDispatchKey(key);
    };
    TORCH_CHECK_NOT_IMPLEMENTED(!forward_needs_rel(s) || has("idl::fixed_point_rel"),
                                "idl: rtol and solver='auto' are not implemented on ",
                                like.device().type(), " yet");
    TORCH_CHECK_NOT_IMPLEMENTED(s.backward != "implicit" || !backward_needs_rel(s) ||
                                    has("idl::fixed_point_adjoint_rel"),
                                "idl: grad_rtol and solver='auto' are not implemented on ",
                                like.device().type(), " yet");
    TORCH_CHECK_NOT_IMPLEMENTED(s.backward == "implicit" || has("idl::phantom_adjoint"),
                                "idl: backward='", s.backward, "' is not implemented on ",
                                like.device().type(), " yet");
}

// ---- forward ---------------------------------------------------------------

inline void check_vector(const OptTensor& v, int64_t size, const at::Tensor& ref, const char* name) {
    if (!v.has_value()) return;
    check_same(*v, ref, name, "A");
    TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == size, "idl: ", name, " must have shape [",
                      size, "], got ", v->sizes());
}

// Shapes: U (m, p), A (n, n), B (n, p), C (q, n), D (q, p), biases (n) and (q).
// The solve checks X0 and the solver settings.
inline void check_layer_args(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const OptTensor& D, const OptTensor& bias_hidden,
                             const OptTensor& bias_out, const Settings& s) {
    check_matrix(A, "A");
    TORCH_CHECK_VALUE(A.size(0) == A.size(1), "idl: A must be square, got ", A.sizes());
    const int64_t n = A.size(0);
    check_matrix(U, "U");
    check_same(U, A, "U", "A");
    check_matrix(B, "B");
    check_same(B, A, "B", "A");
    check_matrix(C, "C");
    check_same(C, A, "C", "A");
    // U's sizes are read symbolically: reading one as an int would specialise
    // a traced graph to its batch size (torch.compile(dynamic=True), export).
    const c10::SymInt p = U.sym_size(1);
    const int64_t q = C.size(0);
    TORCH_CHECK_VALUE(B.size(0) == n && B.sym_size(1) == p,
                      "idl: B must have shape [", n, ", ", p,
                      "] (hidden size, input size), got ", B.sizes());
    TORCH_CHECK_VALUE(C.size(1) == n, "idl: C must have ", n, " columns (the hidden size), got ",
                      C.size(1));
    if (D.has_value()) {
        check_matrix(*D, "D");
        check_same(*D, A, "D", "A");
        TORCH_CHECK_VALUE(D->size(0) == q && D->sym_size(1) == p,
                          "idl: D must have shape [", q, ", ", p,
                          "] (output size, input size), got ", D->sizes());
    }
    check_vector(bias_hidden, n, A, "bias_hidden");
    check_vector(bias_out, q, A, "bias_out");
    check_settings(s);
    if (is_projection(s)) idl_checks::check_kappa(s.kappa);
    check_device_supports(s, A);
}

// Multiply-adds of the layer's largest product, forward or backward: U (m, p),
// A (n, n), C (q, n). Traced with symbolic sizes (torch.compile(dynamic=True),
// torch.export), the layer has no concrete size: reading U's would specialise
// the graph to one batch size, so it is not read, and the bound is returned.
inline int64_t largest_product(const at::Tensor& U, const at::Tensor& A, const at::Tensor& C) {
    if (U.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return kSerialBlasMaxWork;
    const int64_t m = U.size(0), p = U.size(1), n = A.size(0), q = C.size(0);
    return m * std::max({n * p, n * n, q * p, q * n});
}

// A tensor being traced (torch.compile, torch.export, FakeTensorMode) rather
// than holding data: the backward does not write stats into it (a compiled
// graph reports no stats, and a traced write into a forward output would be a
// mutation of it).
inline bool is_traced(const at::Tensor& t) {
    return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python,
                                                    c10::DispatchKey::Functionalize}));
}

// The stats tensor of a layer: forward row from its solve, backward row "not
// run" (-1 iterations) until the backward pass fills it.
inline at::Tensor layer_stats(const at::Tensor& forward) {
    if (forward.is_cpu() && !is_traced(forward)) {  // written in place: five small ops cost ~8 us
        auto stats = at::empty({2, 3}, forward.options());
        const auto solve = forward.contiguous();
        double* out = stats.data_ptr<double>();
        std::copy_n(solve.const_data_ptr<double>(), 3, out);
        out[3] = -1.0, out[4] = 0.0, out[5] = 0.0;
        return stats;
    }
    auto not_run = at::zeros({1, 3}, forward.options());
    not_run[0][0].fill_(-1.0);
    return at::cat({forward.unsqueeze(0), not_run});
}

// The layer runs in its parameters' dtype, autocast or not: its solves'
// tolerances need that precision. (The backward runs under the autocast state
// its forward ran under.)
struct NoAutocast {
    c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

enum StatsRow : int64_t { kForwardRow = 0, kBackwardRow = 1 };

// Writes a solve's stats (3) into one row of a layer's (2, 3), in place on
// the CPU (an op pair there costs more than the backward's small products).
inline void write_row(const at::Tensor& layer_stats, int64_t row, const at::Tensor& solve_stats) {
    if (!layer_stats.is_cpu()) {
        layer_stats[row].copy_(solve_stats);
        return;
    }
    const auto values = solve_stats.contiguous();
    std::copy_n(values.const_data_ptr<double>(), 3, layer_stats.data_ptr<double>() + 3 * row);
}

// The converged code of one row of stats (contiguous rows of 3: a layer's
// (2, 3), or a bare solve's (3)), read without an op on the CPU.
inline double converged_code(const at::Tensor& stats, int64_t row) {
    if (stats.is_cpu()) return stats.const_data_ptr<double>()[3 * row + 2];
    return stats.view({-1, 3})[row][2].item<double>();
}

// Reports the solve of one row of stats [iterations, residual, converged] at
// once if it did not converge, by idl/_stats.py's report_solve (a warning or
// an exception of idl's own classes, as policy asks; the exception carries
// stats). Only that rare case calls into Python.
inline void report_if_not_converged(const at::Tensor& stats, int64_t row, const char* what,
                             const std::string& policy) {
    if (stats.is_meta() || is_traced(stats)) return;
    if (converged_code(stats, row) != 0.0) return;  // converged (code 1, 2 or 3)
    pybind11::gil_scoped_acquire gil;
    pybind11::module_::import("idl._stats")
        .attr("report_solve")(stats.view({-1, 3})[row], what, policy, stats);
}

// Implicit differentiation at the solve's (Ā, Z) for G = dL/dX: V =
// dL/d(pre-activation), solving V = φ'(Z) ⊙ (V Ā + G), or with backward
// "phantom" or "jfb" that of a few damped adjoint steps (idl::phantom_adjoint);
// and the stats of that solve. Then dL/dĀ = Vᵀ X, and V is dL/d(U Bᵀ + b).
inline std::tuple<at::Tensor, at::Tensor> adjoint_of(const at::Tensor& A_bar, const at::Tensor& Z,
                                              const at::Tensor& G, const Settings& s) {
    static const auto adjoint = idl_op<AdjointSignature>("idl::fixed_point_adjoint");
    static const auto adjoint_rel = idl_op<AdjointRelSignature>("idl::fixed_point_adjoint_rel");
    static const auto phantom = idl_op<PhantomSignature>("idl::phantom_adjoint");
    if (s.backward == "jfb") return phantom.call(A_bar, Z, G, s.activation, s.slope, 1, 1.0);
    if (s.backward == "phantom")
        return phantom.call(A_bar, Z, G, s.activation, s.slope, s.phantom_steps, s.phantom_tau);
    if (backward_needs_rel(s))
        return adjoint_rel.call(A_bar, Z, G, s.activation, s.slope, s.grad_max_iter, s.grad_tol,
                                s.grad_rtol, s.method, s.memory);
    return adjoint.call(A_bar, Z, G, s.activation, s.slope, s.grad_max_iter, s.grad_tol, s.method,
                        s.memory);
}

// With create_graph the products of a backward record their history: a
// second derivative through X is exact (X is a saved output); one through the
// adjoint solve or the projection's Jacobian is refused by those ops.
struct BackwardGuards {
    explicit BackwardGuards(const at::Tensor& like, int64_t work)
        : serial(like.device(), work) {
        if (!at::GradMode::is_enabled()) below_autograd.emplace();
    }
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    NoAutocast no_autocast;
    SerialBlasIfSmall serial;
};

// The autograd context holds IValues: the settings go in field by field.
inline void save_settings(AutogradContext* ctx, const Settings& s) {
    auto& d = ctx->saved_data;
    d["well_posed"] = s.well_posed;
    d["kappa"] = s.kappa;
    d["activation"] = s.activation;
    d["slope"] = s.slope;
    d["grad_max_iter"] = s.grad_max_iter;
    d["grad_tol"] = s.grad_tol;
    d["method"] = s.method;
    d["memory"] = s.memory;
    d["grad_rtol"] = s.grad_rtol;
    d["backward"] = s.backward;
    d["phantom_steps"] = s.phantom_steps;
    d["phantom_tau"] = s.phantom_tau;
    d["on_nonconvergence"] = s.on_nonconvergence;
    d["d_scale"] = s.d_scale;
}

// What a backward needs of the settings (the forward solve's are not kept).
inline Settings load_settings(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    Settings s{};
    s.well_posed = d["well_posed"].toStringRef();
    s.kappa = d["kappa"].toDouble();
    s.activation = d["activation"].toStringRef();
    s.slope = d["slope"].toDouble();
    s.grad_max_iter = d["grad_max_iter"].toInt();
    s.grad_tol = d["grad_tol"].toDouble();
    s.method = d["method"].toStringRef();
    s.memory = d["memory"].toInt();
    s.grad_rtol = d["grad_rtol"].toDouble();
    s.backward = d["backward"].toStringRef();
    s.phantom_steps = d["phantom_steps"].toInt();
    s.phantom_tau = d["phantom_tau"].toDouble();
    s.on_nonconvergence = d["on_nonconvergence"].toStringRef();
    s.d_scale = d["d_scale"].toDouble();
    return s;
}

// The settings as an op takes them after its tensors, in schema order: the
// schema's text, the C++ parameters, and the same names as arguments
// (settings_of(IDL_SETTINGS_ARGS)).
#define IDL_SETTINGS_SCHEMA                                                                    \
    "str well_posed, float kappa, str activation, float slope, int max_iter, float tol, "       \
    "int grad_max_iter, float grad_tol, str method, int memory, float rtol=0.0, "              \
    "float grad_rtol=0.0, str backward=\"implicit\", int phantom_steps=5, "                   \
    "float phantom_tau=0.5, str on_nonconvergence=\"warn\", float d_scale=1.0"

#define IDL_SETTINGS_PARAMS                                                                    \
    c10::string_view well_posed, double kappa, c10::string_view activation, double slope,      \
        int64_t max_iter, double tol, int64_t grad_max_iter, double grad_tol,                   \
        c10::string_view method, int64_t memory, double rtol, double grad_rtol,                 \
        c10::string_view backward, int64_t phantom_steps, double phantom_tau,                   \
        c10::string_view on_nonconvergence, double d_scale

#define IDL_SETTINGS_ARGS                                                                      \
    well_posed, kappa, activation, slope, max_iter, tol, grad_max_iter, grad_tol, method,       \
        memory, rtol, grad_rtol, backward, phantom_steps, phantom_tau, on_nonconvergence, d_scale

inline Settings settings_of(c10::string_view well_posed, double kappa, c10::string_view activation,
                            double slope, int64_t max_iter, double tol, int64_t grad_max_iter,
                            double grad_tol, c10::string_view method, int64_t memory, double rtol,
                            double grad_rtol, c10::string_view backward, int64_t phantom_steps,
                            double phantom_tau, c10::string_view on_nonconvergence, double d_scale) {
    return Settings{std::string(well_posed), kappa, std::string(activation), slope, max_iter,
                    tol, grad_max_iter, grad_tol, std::string(method), memory, rtol, grad_rtol,
                    std::string(backward), phantom_steps, phantom_tau,
                    std::string(on_nonconvergence), d_scale};
}

}  // namespace idl_layer

#endif  // IDL_IMPLICIT_LAYER_H
