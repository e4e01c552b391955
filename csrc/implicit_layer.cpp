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
    report_if_not_converged(f.stats, kForwardRow, "forward", s.on_nonconvergence);
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
        "Tensor? bias_out, Tensor? X0, " IDL_SETTINGS_SCHEMA
        ") -> (Tensor Y, Tensor X, Tensor stats)");
}

TORCH_LIBRARY_IMPL(idl, CompositeExplicitAutograd, m) {
    m.impl("implicit_layer", &implicit_layer_forward);
}

TORCH_LIBRARY_IMPL(idl, Autograd, m) {
    m.impl("implicit_layer", &implicit_layer_autograd);
    m.impl("fixed_point", &fixed_point_autograd);
}
