// implicit_layer.cpp: idl::implicit_layer, a whole ImplicitModel forward
//
//     Y = X Cᵀ + d_scale U Dᵀ + b_out,   X = φ(X Āᵀ + U Bᵀ + b_hidden),   Ā = well-posed A,
//
// as one op returning Y, the state X and the stats of its solves, whose
// backward (implicit differentiation) is written here in C++. It is the one
// road of every built-in-activation layer: ImplicitModel's forward and
// implicit_state, the RNN cell, SIM's regenerated states.
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
#include "implicit_layer.h"
#include "serial_blas.h"

namespace {

using idl_checks::check_matrix;
using idl_checks::check_same;
using idl_glue::kSerialBlasMaxWork;
using idl_glue::SerialBlasIfSmall;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using namespace idl_layer;

// ---- forward ---------------------------------------------------------------

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


// The layer's forward, reported.
LayerForward reported_forward(const at::Tensor& U, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const OptTensor& D,
                              const OptTensor& bias_hidden, const OptTensor& bias_out,
                              const OptTensor& X0, const Settings& s) {
    auto f = layer_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    report_if_not_converged(f.stats, kForwardRow, s.on_nonconvergence);
    return f;
}

// ---- autograd ---------------------------------------------------------------

// Inputs of ImplicitLayer::apply, in order; backward returns one gradient each.
enum Input { kU, kA, kB, kC, kD, kBiasHidden, kBiasOut, kX0, kSettings, kInputs };

// The tensor inputs that may be absent, in order: with one absent, the edges
// (and needs_input_grad's indices) of those after it move down by one.
constexpr Input kOptionalInputs[] = {kD, kBiasHidden, kBiasOut, kX0};

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
        static const auto adjoint = idl_op<AdjointSignature>("idl::fixed_point_adjoint");
        static const auto adjoint_rel = idl_op<AdjointRelSignature>("idl::fixed_point_adjoint_rel");
        static const auto phantom = idl_op<PhantomSignature>("idl::phantom_adjoint");
        const auto saved = ctx->get_saved_variables();
        const auto &U = saved[0], &A = saved[1], &A_bar = saved[2], &B = saved[3], &C = saved[4],
                   &D = saved[5], &X = saved[6], &Z = saved[7];
        const Settings s = load_settings(ctx);
        const auto &dY = grads[0], &dX = grads[1];
        // With create_graph the products below record their history: a second
        // derivative through X is exact (X is a saved output); one through the
        // adjoint solve or the projection's Jacobian is refused by those ops.
        std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
        if (!at::GradMode::is_enabled()) below_autograd.emplace();
        const NoAutocast no_autocast;
        SerialBlasIfSmall serial(U.device(), largest_product(U, A, C));

        at::Tensor G = dY.defined() ? dY.mm(C) : at::Tensor();
        if (dX.defined()) G = G.defined() ? G + dX : dX;
        if (!G.defined()) G = at::zeros_like(Z);
        at::Tensor V, stats;
        if (s.backward == "jfb")
            std::tie(V, stats) = phantom.call(A_bar, Z, G, s.activation, s.slope, 1, 1.0);
        else if (s.backward == "phantom")
            std::tie(V, stats) = phantom.call(A_bar, Z, G, s.activation, s.slope, s.phantom_steps,
                                              s.phantom_tau);
        else if (backward_needs_rel(s))
            std::tie(V, stats) = adjoint_rel.call(A_bar, Z, G, s.activation, s.slope,
                                                  s.grad_max_iter, s.grad_tol, s.grad_rtol,
                                                  s.method, s.memory);
        else
            std::tie(V, stats) = adjoint.call(A_bar, Z, G, s.activation, s.slope, s.grad_max_iter,
                                              s.grad_tol, s.method, s.memory);
        const auto& layer_stats = ctx->saved_data["stats"].toTensor();
        if (!is_traced(layer_stats)) {
            layer_stats[kBackwardRow].copy_(stats);
            report_if_not_converged(layer_stats, kBackwardRow, s.on_nonconvergence);
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
        d["grad_rtol"] = s.grad_rtol;
        d["backward"] = s.backward;
        d["phantom_steps"] = s.phantom_steps;
        d["phantom_tau"] = s.phantom_tau;
        d["on_nonconvergence"] = s.on_nonconvergence;
        d["d_scale"] = s.d_scale;
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
        s.grad_rtol = d["grad_rtol"].toDouble();
        s.backward = d["backward"].toStringRef();
        s.phantom_steps = d["phantom_steps"].toInt();
        s.phantom_tau = d["phantom_tau"].toDouble();
        s.on_nonconvergence = d["on_nonconvergence"].toStringRef();
        s.d_scale = d["d_scale"].toDouble();
        return s;
    }
};

// ---- the op's kernels -----------------------------------------------------------

using LayerResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

#define IDL_LAYER_PARAMS                                                                       \
    const at::Tensor &U, const at::Tensor &A, const at::Tensor &B, const at::Tensor &C,         \
        const OptTensor &D, const OptTensor &bias_hidden, const OptTensor &bias_out,            \
        const OptTensor &X0, IDL_SETTINGS_PARAMS

// Below autograd (inference mode, or no input needs a gradient under a mode
// that skips autograd): the forward alone.
LayerResult implicit_layer_forward(IDL_LAYER_PARAMS) {
    const auto s = settings_of(IDL_SETTINGS_ARGS);
    const NoAutocast no_autocast;
    auto f = reported_forward(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    return {f.Y, f.X, f.stats};
}

LayerResult implicit_layer_autograd(IDL_LAYER_PARAMS) {
    const auto s = settings_of(IDL_SETTINGS_ARGS);
    auto out = ImplicitLayer::apply(U, A, B, C, D, bias_hidden, bias_out, X0, s);
    return {out[0], out[1], out[2]};
}

#undef IDL_LAYER_PARAMS

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
}
