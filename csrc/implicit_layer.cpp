// implicit_layer.cpp: idl::implicit_layer, a whole ImplicitModel forward
//
//     Y = X Cᵀ + d_scale U Dᵀ + b_out,   X = φ(X Āᵀ + U Bᵀ + b_hidden),   Ā = well-posed A,
//
// as one op returning Y, the state X and the stats of its solves, whose
// backward (implicit differentiation) is written here in C++. It is the one
// road of every built-in-activation layer: ImplicitModel's forward and
// implicit_state, the RNN cell, SIM's regenerated states. The bare solve
// idl::fixed_point (functional.fixed_point) is differentiated here too, by
// the same adjoint_of.
//
// At the sizes implicit models are often trained at, a training step is mostly
// per-op overhead; as one op, ImplicitModel runs no Python per op in either
// pass. The op composes the other idl:: ops and ATen products through the
// dispatcher, so it runs on every device they run on and traces under
// torch.compile as those ops. No numerics live here.
//
// Stats are data the op returns: a float64 tensor of shape [2, 3] on the
// layer's device, row 0 the forward solve's [iterations, residual, converged],
// row 1 the backward solve's, [-1, 0, 0] (not run) until the backward pass
// writes it. A solve that did not converge is reported (a warning or an
// exception, as on_nonconvergence asks) by idl/_stats.py's report_solve, which
// the op calls only in that rare case: a converged solve costs nothing here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "checks.h"
#include "serial_blas.h"

namespace {

using idl_checks::check_matrix;
using idl_checks::check_same;
using idl_glue::kSerialBlasMaxWork;
using idl_glue::SerialBlasIfSmall;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// ---- the other idl:: ops, called through the dispatcher ---------------------

template <typename Signature>
c10::TypedOperatorHandle<Signature> idl_op(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor project_linf(const at::Tensor& A, double kappa, const std::string& mode) {
    static const auto op =
        idl_op<at::Tensor(const at::Tensor&, double, c10::string_view)>("idl::project_linf");
    return op.call(A, kappa, mode);
}

at::Tensor project_linf_backward(const at::Tensor& grad, const at::Tensor& A, double kappa,
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
// the *_rel ops (CPU only for now).
bool forward_needs_rel(const Settings& s) { return s.rtol != 0.0 || s.method == "auto"; }
bool backward_needs_rel(const Settings& s) { return s.grad_rtol != 0.0 || s.method == "auto"; }

void check_settings(const Settings& s) {
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

bool is_projection(const Settings& s) { return s.well_posed == "exact" || s.well_posed == "scale"; }

// The matrix the solves use in place of the parameter A.
at::Tensor well_posed(const at::Tensor& A, const Settings& s) {
    if (s.well_posed == "triu") return at::triu(A, 1);
    if (is_projection(s)) return project_linf(A, s.kappa, s.well_posed);
    return A;
}

// dL/dA from dL/dĀ: the transpose of well_posed's Jacobian.
at::Tensor well_posed_backward(const at::Tensor& grad, const at::Tensor& A, const Settings& s) {
    if (s.well_posed == "triu") return at::triu(grad, 1);
    if (is_projection(s)) return project_linf_backward(grad, A, s.kappa, s.well_posed);
    return grad;
}

// The ops a layer's settings need beyond idl::fixed_point and
// idl::fixed_point_adjoint must have a kernel on its device (CPU only for
// now): refused at the forward call, with a clear message, rather than in
// the backward pass with the dispatcher's.
void check_device_supports(const Settings& s, const at::Tensor& like) {
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

void check_vector(const OptTensor& v, int64_t size, const at::Tensor& ref, const char* name) {
    if (!v.has_value()) return;
    check_same(*v, ref, name, "A");
    TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == size, "idl: ", name, " must have shape [",
                      size, "], got ", v->sizes());
}

// Shapes: U (m, p), A (n, n), B (n, p), C (q, n), D (q, p), biases (n) and (q).
// The solve checks X0 and the solver settings.
void check_layer_args(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
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
int64_t largest_product(const at::Tensor& U, const at::Tensor& A, const at::Tensor& C) {
    if (U.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return kSerialBlasMaxWork;
    const int64_t m = U.size(0), p = U.size(1), n = A.size(0), q = C.size(0);
    return m * std::max({n * p, n * n, q * p, q * n});
}

// A tensor being traced (torch.compile, torch.export, FakeTensorMode) rather
// than holding data: the backward does not write stats into it (a compiled
// graph reports no stats, and a traced write into a forward output would be a
// mutation of it).
bool is_traced(const at::Tensor& t) {
    return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python,
                                                    c10::DispatchKey::Functionalize}));
}

// The stats tensor of a layer: forward row from its solve, backward row "not
// run" (-1 iterations) until the backward pass fills it.
at::Tensor layer_stats(const at::Tensor& forward) {
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

struct LayerForward {
    at::Tensor Y, X, Z, A_bar, stats;
};

LayerForward layer_forward(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const OptTensor& D, const OptTensor& bias_hidden,
                           const OptTensor& bias_out, const OptTensor& X0, const Settings& s) {
    static const auto solve = idl_op<SolveSignature>("idl::fixed_point");
    static const auto solve_rel = idl_op<SolveRelSignature>("idl::fixed_point_rel");
    check_layer_args(U, A, B, C, D, bias_hidden, bias_out, s);
    SerialBlasIfSmall serial(U.device(), largest_product(U, A, C));
    LayerForward f;
    f.A_bar = well_posed(A, s);
    auto C0 = bias_hidden.has_value() ? at::addmm(*bias_hidden, U, B.t()) : at::mm(U, B.t());
    at::Tensor solve_stats;
    if (forward_needs_rel(s)) {
        // the backward's settings are checked here too, as idl::fixed_point does
        idl_checks::parse_solver(s.method, s.grad_max_iter, s.grad_tol, s.memory,
                                 "grad_max_iter", "grad_tol", s.grad_rtol, "grad_rtol");
        std::tie(f.X, f.Z, solve_stats) = solve_rel.call(f.A_bar, C0, X0, s.activation, s.slope,
                                                         s.max_iter, s.tol, s.rtol, s.method,
                                                         s.memory);
    } else {
        std::tie(f.X, f.Z, solve_stats) =
            solve.call(f.A_bar, C0, X0, s.activation, s.slope, s.max_iter, s.tol,
                       s.grad_max_iter, s.grad_tol, s.method, s.memory);
    }
    f.Y = bias_out.has_value() ? at::addmm(*bias_out, f.X, C.t()) : at::mm(f.X, C.t());
    if (D.has_value()) f.Y.addmm_(U, D->t(), 1.0, s.d_scale);
    f.stats = layer_stats(solve_stats);
    return f;
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
void write_row(const at::Tensor& layer_stats, int64_t row, const at::Tensor& solve_stats) {
    if (!layer_stats.is_cpu()) {
        layer_stats[row].copy_(solve_stats);
        return;
    }
    const auto values = solve_stats.contiguous();
    std::copy_n(values.const_data_ptr<double>(), 3, layer_stats.data_ptr<double>() + 3 * row);
}

// The converged code of one row of stats (contiguous rows of 3: a layer's
// (2, 3), or a bare solve's (3)), read without an op on the CPU.
double converged_code(const at::Tensor& stats, int64_t row) {
    if (stats.is_cpu()) return stats.const_data_ptr<double>()[3 * row + 2];
    return stats.view({-1, 3})[row][2].item<double>();
}

// Reports the solve of one row of stats [iterations, residual, converged] at
// once if it did not converge, by idl/_stats.py's report_solve (a warning or
// an exception of idl's own classes, as policy asks; the exception carries
// stats). Only that rare case calls into Python.
void report_if_not_converged(const at::Tensor& stats, int64_t row, const char* what,
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
std::tuple<at::Tensor, at::Tensor> adjoint_of(const at::Tensor& A_bar, const at::Tensor& Z,
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

// The layer's forward, reported.
LayerForward reported_forward(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const OptTensor& D,
                              const OptTensor& bias_hidden, const OptTensor& bias_out,
                              const OptTensor& X0, const Settings& s) {
    auto f = layer_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    report_if_not_converged(f.stats, kForwardRow, "forward", s.on_nonconvergence);
    return f;
}

// ---- autograd ---------------------------------------------------------------

// Inputs of ImplicitLayer::apply, in order; backward returns one gradient each.
enum Input { kU, kA, kB, kC, kD, kBiasHidden, kBiasOut, kX0, kSettings, kInputs };

// The tensor inputs that may be absent, in order: with one absent, the edges
// (and needs_input_grad's indices) of those after it move down by one.
constexpr Input kOptionalInputs[] = {kD, kBiasHidden, kBiasOut, kX0};

// The autograd context holds IValues: the settings go in field by field.
void save_settings(AutogradContext* ctx, const Settings& s) {
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
Settings load_settings(AutogradContext* ctx) {
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

class ImplicitLayer : public torch::autograd::Function<ImplicitLayer> {
   public:
    static variable_list forward(AutogradContext* ctx, const at::Tensor& U, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                                 const OptTensor& bias_hidden, const OptTensor& bias_out,
                                 const OptTensor& X0, const Settings& s) {
        // Nothing in here records autograd history, so the ops skip their
        // autograd layer (Python, for the idl:: ops) altogether.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const NoAutocast no_autocast;
        auto f = reported_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
        // X is saved as the output it is, so that a double backward (with
        // create_graph) differentiates through it rather than taking it as a
        // constant.
        ctx->save_for_backward({U, A, f.A_bar, B, C, D.value_or(at::Tensor()), f.X, f.Z});
        save_settings(ctx, s);
        ctx->saved_data["stats"] = f.stats;
        ctx->saved_data["present"] = present_inputs(D, bias_hidden, bias_out, X0);
        ctx->mark_non_differentiable({f.stats});
        ctx->set_materialize_grads(false);  // an unused Y or X brings no zeros
        return {f.Y, f.X, f.stats};
    }

    // dL/dX = dY C + dX_direct; V = φ'(Z) ⊙ (V Ā + dL/dX) is dL/d(pre-activation);
    // the rest are products with V and dY. With backward "phantom" or "jfb", V
    // is that of a few damped adjoint steps instead (idl::phantom_adjoint).
    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto &U = saved[0], &A = saved[1], &A_bar = saved[2], &B = saved[3], &C = saved[4],
                   &D = saved[5], &X = saved[6], &Z = saved[7];
        const Settings s = load_settings(ctx);
        const auto &dY = grads[0], &dX = grads[1];
        const BackwardGuards guards(U, largest_product(U, A, C));

        at::Tensor G = dY.defined() ? dY.mm(C) : at::Tensor();
        if (dX.defined()) G = G.defined() ? G + dX : dX;
        if (!G.defined()) G = at::zeros_like(Z);
        auto [V, stats] = adjoint_of(A_bar, Z, G, s);
        const auto& layer_stats = ctx->saved_data["stats"].toTensor();
        if (!is_traced(layer_stats)) {
            write_row(layer_stats, kBackwardRow, stats);
            report_if_not_converged(layer_stats, kBackwardRow, "backward", s.on_nonconvergence);
        }

        const auto present = ctx->saved_data["present"].toIntVector();
        auto needs = [&](Input input) {
            if (input >= kD && !present[input - kD]) return false;
            int64_t edge = input;  // absent optional inputs before it have no edge
            for (Input optional : kOptionalInputs)
                if (optional < input && !present[optional - kD]) --edge;
            return ctx->needs_input_grad(edge);
        };
        variable_list out(kInputs);
        if (needs(kU)) {
            out[kU] = V.mm(B);
            if (D.defined() && dY.defined()) out[kU] = out[kU].addmm(dY, D, 1.0, s.d_scale);
        }
        if (needs(kA)) out[kA] = well_posed_backward(V.t().mm(X), A, s);
        if (needs(kB)) out[kB] = V.t().mm(U);
        if (needs(kC)) out[kC] = dY.defined() ? dY.t().mm(X) : at::zeros_like(C);
        if (needs(kD)) out[kD] = dY.defined() ? dY.t().mm(U).mul_(s.d_scale) : at::zeros_like(D);
        if (needs(kBiasHidden)) out[kBiasHidden] = V.sum(0);
        if (needs(kBiasOut)) out[kBiasOut] = dY.defined() ? dY.sum(0) : at::zeros({C.size(0)}, C.options());
        return out;
    }

   private:
    static std::vector<int64_t> present_inputs(const OptTensor& D, const OptTensor& bias_hidden,
                                               const OptTensor& bias_out, const OptTensor& X0) {
        return {D.has_value(), bias_hidden.has_value(), bias_out.has_value(), X0.has_value()};
    }

};

// idl::fixed_point's autograd: the bare solve X = φ(X Aᵀ + C0) (functional.
// fixed_point), differentiated as the layer is, by adjoint_of: dL/dC0 = V,
// dL/dA = Vᵀ X. Its backward solve has no stats of the caller's to fill, so
// one that did not converge is reported as a warning.
class FixedPoint : public torch::autograd::Function<FixedPoint> {
   public:
    static variable_list forward(AutogradContext* ctx, const at::Tensor& A, const at::Tensor& C0,
                                 const OptTensor& X0, const Settings& s) {
        static const auto solve = idl_op<SolveSignature>("idl::fixed_point");
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        auto [X, Z, stats] = solve.call(A, C0, X0, s.activation, s.slope, s.max_iter, s.tol,
                                        s.grad_max_iter, s.grad_tol, s.method, s.memory);
        ctx->save_for_backward({A, X, Z});
        save_settings(ctx, s);
        ctx->mark_non_differentiable({Z, stats});
        return {X, Z, stats};
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto &A = saved[0], &X = saved[1], &Z = saved[2];
        const Settings s = load_settings(ctx);
        const BackwardGuards guards(X, largest_product(X, A, A));
        const auto G = grads[0].defined() ? grads[0] : at::zeros_like(Z);
        auto [V, stats] = adjoint_of(A, Z, G, s);
        report_if_not_converged(stats, 0, "backward", "warn");
        // one gradient per forward input: A, C0, X0, the settings
        return {ctx->needs_input_grad(0) ? V.t().mm(X) : at::Tensor(), V, at::Tensor(),
                at::Tensor()};
    }
};

// ---- the op's kernels -----------------------------------------------------------

using LayerResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

#define IDL_LAYER_PARAMS                                                                       \
    const at::Tensor &U, const at::Tensor &A, const at::Tensor &B, const at::Tensor &C,         \
        const OptTensor &D, const OptTensor &bias_hidden, const OptTensor &bias_out,            \
        const OptTensor &X0, c10::string_view well_posed, double kappa,                         \
        c10::string_view activation, double slope, int64_t max_iter, double tol,                \
        int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory,        \
        double rtol, double grad_rtol, c10::string_view backward, int64_t phantom_steps,        \
        double phantom_tau, c10::string_view on_nonconvergence, double d_scale

#define IDL_LAYER_SETTINGS                                                                     \
    well_posed, kappa, activation, slope, max_iter, tol, grad_max_iter, grad_tol, method,       \
        memory, rtol, grad_rtol, backward, phantom_steps, phantom_tau, on_nonconvergence, d_scale

Settings settings_of(c10::string_view well_posed, double kappa, c10::string_view activation,
                     double slope, int64_t max_iter, double tol, int64_t grad_max_iter,
                     double grad_tol, c10::string_view method, int64_t memory, double rtol,
                     double grad_rtol, c10::string_view backward, int64_t phantom_steps,
                     double phantom_tau, c10::string_view on_nonconvergence, double d_scale) {
    return Settings{std::string(well_posed), kappa, std::string(activation), slope, max_iter,
                    tol, grad_max_iter, grad_tol, std::string(method), memory, rtol, grad_rtol,
                    std::string(backward), phantom_steps, phantom_tau,
                    std::string(on_nonconvergence), d_scale};
}

// Below autograd (inference mode, or no input needs a gradient under a mode
// that skips autograd): the forward alone.
LayerResult implicit_layer_forward(IDL_LAYER_PARAMS) {
    const auto s = settings_of(IDL_LAYER_SETTINGS);
    const NoAutocast no_autocast;
    auto f = reported_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    return {f.Y, f.X, f.stats};
}

LayerResult implicit_layer_autograd(IDL_LAYER_PARAMS) {
    const auto s = settings_of(IDL_LAYER_SETTINGS);
    auto out = ImplicitLayer::apply(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    return {out[0], out[1], out[2]};
}

#undef IDL_LAYER_PARAMS
#undef IDL_LAYER_SETTINGS

std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_autograd(
    const at::Tensor& A, const at::Tensor& C0, const OptTensor& X0, c10::string_view activation,
    double slope, int64_t max_iter, double tol, int64_t grad_max_iter, double grad_tol,
    c10::string_view method, int64_t memory) {
    Settings s{};
    s.activation = std::string(activation);
    s.slope = slope;
    s.max_iter = max_iter;
    s.tol = tol;
    s.grad_max_iter = grad_max_iter;
    s.grad_tol = grad_tol;
    s.method = std::string(method);
    s.memory = memory;
    auto out = FixedPoint::apply(A, C0, X0, s);
    return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idl, m) {
    m.def(
        "implicit_layer(Tensor U, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? bias_hidden, "
        "Tensor? bias_out, Tensor? X0, str well_posed, float kappa, str activation, float slope, "
        "int max_iter, float tol, int grad_max_iter, float grad_tol, str method, int memory, "
        "float rtol=0.0, float grad_rtol=0.0, str backward=\"implicit\", int phantom_steps=5, "
        "float phantom_tau=0.5, str on_nonconvergence=\"warn\", float d_scale=1.0) -> (Tensor Y, "
        "Tensor X, Tensor stats)");
}

TORCH_LIBRARY_IMPL(idl, CompositeExplicitAutograd, m) {
    m.impl("implicit_layer", &implicit_layer_forward);
}

TORCH_LIBRARY_IMPL(idl, Autograd, m) {
    m.impl("implicit_layer", &implicit_layer_autograd);
    m.impl("fixed_point", &fixed_point_autograd);
}
