// implicit_layer.cpp: idl::implicit_layer, a whole ImplicitModel forward
//
//     Y = X Cᵀ + U Dᵀ + b_out,   X = φ(X Āᵀ + U Bᵀ + b_hidden),   Ā = well-posed A,
//
// as one op whose backward (implicit differentiation) is written here in C++.
// At the sizes implicit models are often trained at, a training step is mostly
// per-op overhead; as one op, ImplicitModel runs no Python per op in either
// pass. The op composes the other idl:: ops and ATen products through the
// dispatcher, so it runs on every device they run on and traces under
// torch.compile as those ops. No numerics live here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "checks.h"
#include "serial_blas.h"

namespace {

using idl_checks::check_matrix;
using idl_checks::check_same;
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

// Hands a backward solve that did not converge to idl/_ops.py, which warns or
// raises as the layer's on_nonconvergence asks (with Python's warning and
// exception classes, which C++ cannot name).
void report_nonconvergence(const at::Tensor& stats, const std::string& policy) {
    static const auto op = idl_op<void(const at::Tensor&, c10::string_view, c10::string_view)>(
        "idl::report_nonconvergence");
    op.call(stats, "backward", policy);
}

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
    std::string on_nonconvergence;
};

void check_settings(const Settings& s) {
    TORCH_CHECK_VALUE(s.well_posed == "none" || s.well_posed == "triu" ||
                          s.well_posed == "exact" || s.well_posed == "scale",
                      "idl: well_posed must be 'none', 'triu', 'exact' or 'scale', got '",
                      s.well_posed, "'");
    TORCH_CHECK_VALUE(s.on_nonconvergence == "warn" || s.on_nonconvergence == "raise",
                      "idl: on_nonconvergence must be 'warn' or 'raise', got '",
                      s.on_nonconvergence, "'");
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
    const int64_t p = U.size(1), q = C.size(0);
    TORCH_CHECK_VALUE(B.size(0) == n && B.size(1) == p, "idl: B must have shape [", n, ", ", p,
                      "] (hidden size, input size), got ", B.sizes());
    TORCH_CHECK_VALUE(C.size(1) == n, "idl: C must have ", n, " columns (the hidden size), got ",
                      C.size(1));
    if (D.has_value()) {
        check_matrix(*D, "D");
        check_same(*D, A, "D", "A");
        TORCH_CHECK_VALUE(D->size(0) == q && D->size(1) == p, "idl: D must have shape [", q, ", ",
                          p, "] (output size, input size), got ", D->sizes());
    }
    check_vector(bias_hidden, n, A, "bias_hidden");
    check_vector(bias_out, q, A, "bias_out");
    check_settings(s);
    if (is_projection(s)) idl_checks::check_kappa(s.kappa);
}

// The backward writes its stats [iterations, residual, converged] there.
void check_report(const OptTensor& report) {
    if (!report.has_value()) return;
    TORCH_CHECK_VALUE(report->device().is_cpu() && report->scalar_type() == at::kDouble &&
                          report->dim() == 1 && report->size(0) == 3 && report->is_contiguous(),
                      "idl: backward_report must be a contiguous float64 CPU tensor of shape [3]");
}

// Multiply-adds of the layer's largest product, forward or backward: U (m, p),
// A (n, n), C (q, n).
int64_t largest_product(const at::Tensor& U, const at::Tensor& A, const at::Tensor& C) {
    const int64_t m = U.size(0), p = U.size(1), n = A.size(0), q = C.size(0);
    return m * std::max({n * p, n * n, q * p, q * n});
}

struct LayerForward {
    at::Tensor Y, stats, A_bar, X, Z;
};

LayerForward layer_forward(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& C, const OptTensor& D, const OptTensor& bias_hidden,
                           const OptTensor& bias_out, const OptTensor& X0, const Settings& s) {
    static const auto solve = idl_op<SolveSignature>("idl::fixed_point");
    check_layer_args(U, A, B, C, D, bias_hidden, bias_out, s);
    SerialBlasIfSmall serial(U.device(), largest_product(U, A, C));
    LayerForward f;
    f.A_bar = well_posed(A, s);
    auto C0 = bias_hidden.has_value() ? at::addmm(*bias_hidden, U, B.t()) : at::mm(U, B.t());
    std::tie(f.X, f.Z, f.stats) = solve.call(f.A_bar, C0, X0, s.activation, s.slope, s.max_iter,
                                             s.tol, s.grad_max_iter, s.grad_tol, s.method,
                                             s.memory);
    f.Y = bias_out.has_value() ? at::addmm(*bias_out, f.X, C.t()) : at::mm(f.X, C.t());
    if (D.has_value()) f.Y.addmm_(U, D->t());
    return f;
}

// ---- autograd ---------------------------------------------------------------

// Inputs of ImplicitLayer::apply, in order; backward returns one gradient each.
enum Input { kU, kA, kB, kC, kD, kBiasHidden, kBiasOut, kX0, kSettings, kReport, kInputs };

class ImplicitLayer : public torch::autograd::Function<ImplicitLayer> {
   public:
    static variable_list forward(AutogradContext* ctx, const at::Tensor& U, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                                 const OptTensor& bias_hidden, const OptTensor& bias_out,
                                 const OptTensor& X0, const Settings& s, const OptTensor& report) {
        // Nothing in here records autograd history, so the ops skip their
        // autograd layer (Python, for the idl:: ops) altogether.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        check_report(report);
        auto f = layer_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
        ctx->save_for_backward({U, A, f.A_bar, B, C, D.value_or(at::Tensor()), f.X, f.Z});
        save_settings(ctx, s);
        ctx->saved_data["report"] = report.value_or(at::Tensor());
        ctx->saved_data["has_bias"] = bias_hidden.has_value();
        ctx->mark_non_differentiable({f.stats});
        return {f.Y, f.stats};
    }

    // dL/dX = dY C; V = φ'(Z) ⊙ (V Ā + dL/dX) is dL/d(pre-activation); the
    // rest are products with V and dY.
    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        static const auto adjoint = idl_op<AdjointSignature>("idl::fixed_point_adjoint");
        const auto saved = ctx->get_saved_variables();
        const auto &U = saved[0], &A = saved[1], &A_bar = saved[2], &B = saved[3], &C = saved[4],
                   &D = saved[5], &X = saved[6], &Z = saved[7];
        const Settings s = load_settings(ctx);
        const auto& dY = grads[0];
        // With create_graph the products below record their history, and the
        // adjoint op's autograd layer refuses a second derivative.
        std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
        if (!at::GradMode::is_enabled()) below_autograd.emplace();
        SerialBlasIfSmall serial(U.device(), largest_product(U, A, C));

        auto [V, stats] = adjoint.call(A_bar, Z, dY.mm(C), s.activation, s.slope, s.grad_max_iter,
                                       s.grad_tol, s.method, s.memory);
        report(ctx->saved_data["report"].toTensor(), stats, s);

        // needs_input_grad counts only the tensors given (an absent optional
        // has no edge); the gradients returned are one per input.
        const bool has_bias = ctx->saved_data["has_bias"].toBool();
        const size_t bias_edge = D.defined() ? kBiasHidden : kD;
        auto needs = [&](Input input) {
            switch (input) {
                case kD: return D.defined() && ctx->needs_input_grad(kD);
                case kBiasHidden: return has_bias && ctx->needs_input_grad(bias_edge);
                case kBiasOut: return has_bias && ctx->needs_input_grad(bias_edge + 1);
                default: return ctx->needs_input_grad(input);
            }
        };
        variable_list out(kInputs);
        if (needs(kU)) {
            out[kU] = V.mm(B);
            if (D.defined()) out[kU].addmm_(dY, D);
        }
        if (needs(kA)) out[kA] = well_posed_backward(V.t().mm(X), A, s);
        if (needs(kB)) out[kB] = V.t().mm(U);
        if (needs(kC)) out[kC] = dY.t().mm(X);
        if (needs(kD)) out[kD] = dY.t().mm(U);
        if (needs(kBiasHidden)) out[kBiasHidden] = V.sum(0);
        if (needs(kBiasOut)) out[kBiasOut] = dY.sum(0);
        return out;
    }

   private:
    // The autograd context holds IValues: the settings go in field by field.
    static void save_settings(AutogradContext* ctx, const Settings& s) {
        auto& d = ctx->saved_data;
        d["well_posed"] = s.well_posed;
        d["kappa"] = s.kappa;
        d["activation"] = s.activation;
        d["slope"] = s.slope;
        d["grad_max_iter"] = s.grad_max_iter;
        d["grad_tol"] = s.grad_tol;
        d["method"] = s.method;
        d["memory"] = s.memory;
        d["on_nonconvergence"] = s.on_nonconvergence;
    }

    // What backward needs of the settings (the forward solve's are not kept).
    static Settings load_settings(AutogradContext* ctx) {
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
        s.on_nonconvergence = d["on_nonconvergence"].toStringRef();
        return s;
    }

    // Copies the backward solve's stats into the caller's report tensor (if
    // any: a compiled graph has none) and reports non-convergence.
    static void report(const at::Tensor& report_to, const at::Tensor& stats, const Settings& s) {
        if (!report_to.defined()) return;
        report_to.copy_(stats);
        if (report_to.const_data_ptr<double>()[2] == 0.0)
            report_nonconvergence(report_to, s.on_nonconvergence);
    }
};

// ---- the op's kernels -----------------------------------------------------------

using LayerResult = std::tuple<at::Tensor, at::Tensor>;

#define IDL_LAYER_PARAMS                                                                       \
    const at::Tensor &U, const at::Tensor &A, const at::Tensor &B, const at::Tensor &C,         \
        const OptTensor &D, const OptTensor &bias_hidden, const OptTensor &bias_out,            \
        const OptTensor &X0, c10::string_view well_posed, double kappa,                         \
        c10::string_view activation, double slope, int64_t max_iter, double tol,                \
        int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory,        \
        c10::string_view on_nonconvergence, const OptTensor &report

Settings settings_of(c10::string_view well_posed, double kappa, c10::string_view activation,
                     double slope, int64_t max_iter, double tol, int64_t grad_max_iter,
                     double grad_tol, c10::string_view method, int64_t memory,
                     c10::string_view on_nonconvergence) {
    return Settings{std::string(well_posed), kappa, std::string(activation), slope, max_iter,
                    tol, grad_max_iter, grad_tol, std::string(method), memory,
                    std::string(on_nonconvergence)};
}

// Below autograd (inference mode, or no input needs a gradient under a mode
// that skips autograd): the forward alone.
LayerResult implicit_layer_forward(IDL_LAYER_PARAMS) {
    const auto s = settings_of(well_posed, kappa, activation, slope, max_iter, tol, grad_max_iter,
                               grad_tol, method, memory, on_nonconvergence);
    auto f = layer_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    return {f.Y, f.stats};
}

LayerResult implicit_layer_autograd(IDL_LAYER_PARAMS) {
    const auto s = settings_of(well_posed, kappa, activation, slope, max_iter, tol, grad_max_iter,
                               grad_tol, method, memory, on_nonconvergence);
    auto out = ImplicitLayer::apply(U, A, B, C, D, bias_hidden, bias_out, X0, s, report);
    return {out[0], out[1]};
}

#undef IDL_LAYER_PARAMS

}  // namespace

TORCH_LIBRARY_FRAGMENT(idl, m) {
    m.def(
        "implicit_layer(Tensor U, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? bias_hidden, "
        "Tensor? bias_out, Tensor? X0, str well_posed, float kappa, str activation, float slope, "
        "int max_iter, float tol, int grad_max_iter, float grad_tol, str method, int memory, "
        "str on_nonconvergence, Tensor? backward_report) -> (Tensor Y, Tensor stats)");
}

TORCH_LIBRARY_IMPL(idl, CompositeExplicitAutograd, m) {
    m.impl("implicit_layer", &implicit_layer_forward);
}

TORCH_LIBRARY_IMPL(idl, Autograd, m) {
    m.impl("implicit_layer", &implicit_layer_autograd);
}
