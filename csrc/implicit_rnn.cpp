// implicit_rnn.cpp: idl::implicit_rnn, a whole ImplicitRNNCell recurrence as
// one op. At step t, with U_t = [x_t, h_{t-1}] (h_0 the given h0, or zeros),
//
//     X_t = φ(X_t Āᵀ + U_t Bᵀ + b_hidden),   h_t = X_t Cᵀ + d_scale U_t Dᵀ + b_out,
//
// each step's solve starting from X_{t-1} (a warm start: the same fixed point,
// reached in fewer iterations); Ā (the well-posed A) is made once per
// sequence. It returns every h_t, batch-first (batch, T, hidden), the stats of
// its solves merged over the steps ([2, 3], as idl::implicit_layer's) and
// every step's own ([T, 2, 3]). Its backward is backpropagation through time,
// written here in C++: for t = T-1 .. 0, the implicit-differentiation adjoint
// solve of step t, and the parameters' products once over all the steps.
//
// With lengths (batch,), sequence i runs lengths[i] steps, as the cell's
// padded sequences do: past its length its h stays (h_t = h_{t-1}) and its
// outputs are zero (its solves still run, on the padding: the warm start of
// every sample is the last solve's X).
//
// x's share of every step's products (x_t Bᵀ and x_t Dᵀ) is one product over
// the whole sequence; a step adds h_{t-1}'s. As idl::implicit_layer, the op
// composes the other idl:: ops and ATen products through the dispatcher: no
// numerics live here.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "implicit_layer.h"

namespace {

using namespace idl_layer;
using idl_glue::SerialBlasIfSmall;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- checks -------------------------------------------------------------------

// x (m, T, p_in), h0 (m, q) or none, lengths (m) integers or none; the
// layer's own as idl::implicit_layer checks them, for U = [x_t, h_{t-1}]
// (m, p_in + q) and an output of size q.
void check_rnn_args(const at::Tensor& x, const OptTensor& h0, const OptTensor& lengths,
                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                    const OptTensor& D, const OptTensor& bias_hidden, const OptTensor& bias_out,
                    const Settings& s) {
    TORCH_CHECK_VALUE(x.dim() == 3, "idl: x must be a 3-D tensor (batch, seq_len, input), got ",
                      x.dim(), "-D");
    idl_checks::check_floating(x, "x");
    check_matrix(C, "C");
    TORCH_CHECK_VALUE(x.sym_size(1) >= 1, "idl: x must hold at least one time step");
    const int64_t q = C.size(0);
    if (h0.has_value()) {
        check_matrix(*h0, "h0");
        check_same(*h0, A, "h0", "A");
        TORCH_CHECK_VALUE(h0->sym_size(0) == x.sym_size(0) && h0->size(1) == q,
                          "idl: h0 must have shape [", x.sym_size(0), ", ", q,
                          "] (batch, hidden), got ", h0->sizes());
    }
    if (lengths.has_value()) {
        TORCH_CHECK_TYPE(lengths->scalar_type() == at::kLong, "idl: lengths must be int64, got ",
                         lengths->scalar_type());
        TORCH_CHECK_VALUE(lengths->device() == x.device(), "idl: lengths is on ",
                          lengths->device(), " but x is on ", x.device());
        TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->sym_size(0) == x.sym_size(0),
                          "idl: lengths must have shape [", x.sym_size(0), "] (batch), got ",
                          lengths->sizes());
    }
    // One step's input [x_t, h_{t-1}], shape-only: the layer's checks read
    // only its kind and its number of columns.
    const auto U = at::empty_symint({0, x.sym_size(2) + q}, x.options());
    check_layer_args(U, A, B, C, D, bias_hidden, bias_out, s);
    if (forward_needs_rel(s))  // the backward's settings, as idl::fixed_point checks them
        idl_checks::parse_solver(s.method, s.grad_max_iter, s.grad_tol, s.memory,
                                 "grad_max_iter", "grad_tol", s.grad_rtol, "grad_rtol");
}

// Multiply-adds of the largest product: those over the whole sequence, with
// m·T rows (see largest_product).
int64_t sequence_product(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C) {
    if (x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return kSerialBlasMaxWork;
    const int64_t rows = x.size(0) * x.size(1), n = A.size(0), p = B.size(1), q = C.size(0);
    return rows * std::max({n * p, n * n, q * p, q * n});
}

// ---- the solves -----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_solve(const at::Tensor& A_bar,
                                                             const at::Tensor& C0,
                                                             const OptTensor& X0,
                                                             const Settings& s) {
    static const auto solve = idl_op<SolveSignature>("idl::fixed_point");
    static const auto solve_rel = idl_op<SolveRelSignature>("idl::fixed_point_rel");
    if (forward_needs_rel(s))
        return solve_rel.call(A_bar, C0, X0, s.activation, s.slope, s.max_iter, s.tol, s.rtol,
                              s.method, s.memory);
    return solve.call(A_bar, C0, X0, s.activation, s.slope, s.max_iter, s.tol, s.grad_max_iter,
                      s.grad_tol, s.method, s.memory);
}

// ---- stats ----------------------------------------------------------------------

// One row [iterations, residual, converged] over the steps' rows (T, 3): the
// most iterations, the largest residual (NaN if any is), and the converged
// code 0 if any step did not converge, else the loosest test that ended one
// (the largest code), as idl/_stats.py's SolveStats merges them.
at::Tensor merged_row(const at::Tensor& rows) {
    auto merged = std::get<0>(rows.max(0));
    merged.select(0, 2).mul_(rows.select(1, 2).min().ne(0));
    return merged;
}

// ---- forward --------------------------------------------------------------------

struct RnnForward {
    at::Tensor outputs, stats, step_stats;  // the op's outputs
    at::Tensor A_bar, X, Z;                 // X, Z: (T, m, n), every step's
    at::Tensor h;        // (m, T, q): every step's h_t (outputs, but with lengths)
    at::Tensor active;   // (m, T, 1) bool, t < lengths; undefined without lengths
};

// t < lengths, (m, T, 1) bool.
at::Tensor active_steps(const at::Tensor& lengths, int64_t T) {
    return at::arange(T, lengths.options()).unsqueeze(0).lt(lengths.unsqueeze(1)).unsqueeze(2);
}

RnnForward rnn_forward(const at::Tensor& x, const OptTensor& h0, const OptTensor& lengths,
                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const OptTensor& D, const OptTensor& bias_hidden, const OptTensor& bias_out,
                       const Settings& s) {
    check_rnn_args(x, h0, lengths, A, B, C, D, bias_hidden, bias_out, s);
    SerialBlasIfSmall serial(x.device(), sequence_product(x, A, B, C));
    const int64_t m = x.size(0), T = x.size(1), p_in = x.size(2), q = C.size(0);
    RnnForward f;
    f.A_bar = well_posed(A, s);
    // x's share of every step, one product each: (m, T, n) and (m, T, q)
    const auto x_rows = x.reshape({m * T, p_in});
    const auto Bx = B.narrow(1, 0, p_in);
    const auto Cx = (bias_hidden.has_value() ? at::addmm(*bias_hidden, x_rows, Bx.t())
                                             : at::mm(x_rows, Bx.t()))
                        .view({m, T, -1});
    at::Tensor Yx, DhT;
    if (D.has_value()) {
        Yx = bias_out.has_value() ? at::addmm(*bias_out, x_rows, D->narrow(1, 0, p_in).t(), 1.0,
                                              s.d_scale)
                                  : at::mm(x_rows, D->narrow(1, 0, p_in).t()).mul_(s.d_scale);
        Yx = Yx.view({m, T, q});
        DhT = D->narrow(1, p_in, q).t();
    }
    const auto BhT = B.narrow(1, p_in, q).t(), CT = C.t();

    // h_t is written in place, into the outputs (with lengths: each step's new
    // h, which a sequence past its length does not take)
    f.outputs = at::empty({m, T, q}, x.options());
    if (lengths.has_value()) {
        f.active = active_steps(*lengths, T);
        f.h = at::empty({m, T, q}, x.options());
    }
    std::vector<at::Tensor> X(T), Z(T), step(T);
    at::Tensor h = h0.has_value() ? *h0 : at::zeros({m, q}, x.options());
    for (int64_t t = 0; t < T; ++t) {
        const auto C0 = at::addmm(Cx.select(1, t), h, BhT);
        std::tie(X[t], Z[t], step[t]) =
            forward_solve(f.A_bar, C0, t == 0 ? OptTensor() : OptTensor(X[t - 1]), s);
        auto h_t = f.outputs.select(1, t);
        if (Yx.defined()) {
            at::addmm_out(h_t, Yx.select(1, t), X[t], CT);
            h_t.addmm_(h, DhT, 1.0, s.d_scale);
        } else if (bias_out.has_value()) {
            at::addmm_out(h_t, *bias_out, X[t], CT);
        } else {
            at::mm_out(h_t, X[t], CT);
        }
        if (f.active.defined())
            h = f.h.select(1, t).copy_(at::where(f.active.select(1, t), h_t, h));
        else
            h = h_t;
    }
    if (f.active.defined())
        f.outputs.masked_fill_(f.active.logical_not(), 0.0);
    else
        f.h = f.outputs;
    f.X = at::stack(X);
    f.Z = at::stack(Z);
    const auto forward_rows = at::stack(step);
    auto not_run = at::zeros_like(forward_rows);
    not_run.select(1, 0).fill_(-1.0);
    f.step_stats = at::stack({forward_rows, not_run}, 1);
    f.stats = layer_stats(merged_row(forward_rows));
    return f;
}

RnnForward reported_rnn_forward(const at::Tensor& x, const OptTensor& h0,
                                const OptTensor& lengths, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& C, const OptTensor& D,
                                const OptTensor& bias_hidden, const OptTensor& bias_out,
                                const Settings& s) {
    auto f = rnn_forward(x, h0, lengths, A, B, C, D, bias_hidden, bias_out, s);
    report_if_not_converged(f.stats, kForwardRow, "forward", s.on_nonconvergence);
    return f;
}

// ---- autograd -------------------------------------------------------------------

// Inputs of ImplicitRNN::apply, in order; backward returns one gradient each.
// An absent optional tensor has no edge: the edges (and needs_input_grad's
// indices) of the inputs after it move down by one.
enum Input { kX, kH0, kLengths, kA, kB, kC, kD, kBiasHidden, kBiasOut, kSettings, kInputs };

class ImplicitRNN : public torch::autograd::Function<ImplicitRNN> {
   public:
    static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& h0,
                                 const OptTensor& lengths, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                                 const OptTensor& bias_hidden, const OptTensor& bias_out,
                                 const Settings& s) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const NoAutocast no_autocast;
        auto f = reported_rnn_forward(x, h0, lengths, A, B, C, D, bias_hidden, bias_out, s);
        // the outputs as the output they are (without lengths, every h_t); with
        // lengths, every h_t and the active steps besides
        ctx->save_for_backward({x, h0.value_or(at::Tensor()), A, f.A_bar, B, C,
                                D.value_or(at::Tensor()), f.X, f.Z, f.outputs,
                                f.active.defined() ? f.h : at::Tensor(), f.active});
        ctx->saved_data["edges"] =
            edges({true, h0.has_value(), lengths.has_value(), true, true, true, D.has_value(),
                   bias_hidden.has_value(), bias_out.has_value()});
        save_settings(ctx, s);
        ctx->saved_data["stats"] = f.stats;
        ctx->saved_data["step_stats"] = f.step_stats;
        ctx->mark_non_differentiable({f.stats, f.step_stats});
        ctx->set_materialize_grads(false);
        return {f.outputs, f.stats, f.step_stats};
    }

    // Backpropagation through time. G_t = dL/dh_t (the outputs' gradient plus
    // what step t+1 sends back), V_t = φ'(Z_t) ⊙ (V_t Ā + G_t C), and step t
    // sends dL/dh_{t-1} = V_t B_h + d_scale G_t D_h; the parameters' gradients
    // are sums over the steps, one product each over all of them. With
    // lengths, a sequence past its length has G_t = 0 (so V_t = 0) and hands
    // dL/dh_t on to h_{t-1} unchanged.
    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto& dOut = grads[0];
        variable_list out(kInputs);
        if (!dOut.defined()) return out;
        const auto edge = ctx->saved_data["edges"].toIntVector();
        auto needs = [&](Input input) { return edge[input] >= 0 && ctx->needs_input_grad(edge[input]); };
        const auto saved = ctx->get_saved_variables();
        const auto &x = saved[0], &h0 = saved[1], &A = saved[2], &A_bar = saved[3], &B = saved[4],
                   &C = saved[5], &D = saved[6], &X = saved[7], &Z = saved[8],
                   &active = saved[11];
        const auto& H = active.defined() ? saved[10] : saved[9];  // every h_t
        const Settings s = load_settings(ctx);
        const BackwardGuards guards(x, sequence_product(x, A, B, C));
        const int64_t m = x.size(0), T = x.size(1), p_in = x.size(2), q = C.size(0),
                      n = A.size(0);
        const auto Bh = B.narrow(1, p_in, q);
        const auto Dh = D.defined() ? D.narrow(1, p_in, q) : at::Tensor();

        std::vector<at::Tensor> V(T), G(T), step(T);
        at::Tensor dh;  // dL/dh_t from step t+1
        for (int64_t t = T - 1; t >= 0; --t) {
            G[t] = dh.defined() ? dOut.select(1, t) + dh : dOut.select(1, t);
            at::Tensor kept;  // what a sequence past its length hands on
            if (active.defined()) {
                const auto on = active.select(1, t);
                if (dh.defined()) kept = at::where(on, 0.0, dh);
                G[t] = at::where(on, G[t], 0.0);
            }
            std::tie(V[t], step[t]) = adjoint_of(A_bar, Z[t], G[t].mm(C), s);
            if (t == 0 && !needs(kH0)) break;
            dh = V[t].mm(Bh);
            if (D.defined()) dh.addmm_(G[t], Dh, 1.0, s.d_scale);
            if (kept.defined()) dh.add_(kept);
        }
        report_backward(ctx, at::stack(step), s);

        // every step at once: rows (t, sample), time-major
        const auto Vs = at::stack(V).view({T * m, n}), Gs = at::stack(G).view({T * m, q});
        const auto Xs = X.view({T * m, n});
        auto U = [&] {  // [x_t, h_{t-1}] of every step
            const auto h_first = h0.defined() ? h0 : at::zeros({m, q}, x.options());
            const auto h_prev = at::cat({h_first.unsqueeze(0),
                                         H.transpose(0, 1).narrow(0, 0, T - 1)});
            return at::cat({x.transpose(0, 1), h_prev}, 2).view({T * m, p_in + q});
        };
        if (needs(kX)) {
            auto dx = Vs.mm(B.narrow(1, 0, p_in));
            if (D.defined()) dx.addmm_(Gs, D.narrow(1, 0, p_in), 1.0, s.d_scale);
            out[kX] = dx.view({T, m, p_in}).transpose(0, 1);
        }
        if (needs(kH0)) out[kH0] = dh;
        if (needs(kA)) out[kA] = well_posed_backward(Vs.t().mm(Xs), A, s);
        if (needs(kB) || needs(kD)) {
            const auto Us = U();
            if (needs(kB)) out[kB] = Vs.t().mm(Us);
            if (needs(kD)) out[kD] = Gs.t().mm(Us).mul_(s.d_scale);
        }
        if (needs(kC)) out[kC] = Gs.t().mm(Xs);
        if (needs(kBiasHidden)) out[kBiasHidden] = Vs.sum(0);
        if (needs(kBiasOut)) out[kBiasOut] = Gs.sum(0);
        return out;
    }

   private:
    // Each input's edge index, -1 for an absent one.
    static std::vector<int64_t> edges(const std::vector<bool>& present) {
        std::vector<int64_t> index;
        int64_t next = 0;
        for (bool p : present) index.push_back(p ? next++ : -1);
        return index;
    }

    // The backward rows of the step stats and of the merged stats, then the
    // report of a backward that did not converge.
    static void report_backward(AutogradContext* ctx, const at::Tensor& rows, const Settings& s) {
        const auto& stats = ctx->saved_data["stats"].toTensor();
        if (is_traced(stats)) return;
        ctx->saved_data["step_stats"].toTensor().select(1, kBackwardRow).copy_(rows);
        write_row(stats, kBackwardRow, merged_row(rows));
        report_if_not_converged(stats, kBackwardRow, "backward", s.on_nonconvergence);
    }
};

// ---- the op's kernels -------------------------------------------------------------

using RnnResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

#define IDL_RNN_PARAMS                                                                         \
    const at::Tensor &x, const OptTensor &h0, const at::Tensor &A, const at::Tensor &B,         \
        const at::Tensor &C, const OptTensor &D, const OptTensor &bias_hidden,                  \
        const OptTensor &bias_out, const OptTensor &lengths, IDL_SETTINGS_PARAMS

RnnResult implicit_rnn_forward(IDL_RNN_PARAMS) {
    const auto s = settings_of(IDL_SETTINGS_ARGS);
    const NoAutocast no_autocast;
    auto f = reported_rnn_forward(x, h0, lengths, A, B, C, D, bias_hidden, bias_out, s);
    return {f.outputs, f.stats, f.step_stats};
}

RnnResult implicit_rnn_autograd(IDL_RNN_PARAMS) {
    const auto s = settings_of(IDL_SETTINGS_ARGS);
    auto out = ImplicitRNN::apply(x, h0, lengths, A, B, C, D, bias_hidden, bias_out, s);
    return {out[0], out[1], out[2]};
}

#undef IDL_RNN_PARAMS

}  // namespace

TORCH_LIBRARY_FRAGMENT(idl, m) {
    m.def(
        "implicit_rnn(Tensor x, Tensor? h0, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? bias_hidden, Tensor? bias_out, Tensor? lengths, " IDL_SETTINGS_SCHEMA
        ") -> (Tensor outputs, Tensor stats, Tensor step_stats)");
}

TORCH_LIBRARY_IMPL(idl, CompositeExplicitAutograd, m) {
    m.impl("implicit_rnn", &implicit_rnn_forward);
}

TORCH_LIBRARY_IMPL(idl, Autograd, m) {
    m.impl("implicit_rnn", &implicit_rnn_autograd);
}
