"""A table of bad inputs, each answered by a clear exception that names the
argument: never a crash, a hang, or a silently wrong result. Non-finite values
(NaN/Inf in inputs and parameters) and solves that do not converge follow the
non-convergence policy: a warning by default, SolveNotConverged on request,
with iterations and residual in the message.

tests/test_errors.py has the first cases for ImplicitModel; the rows here are
new ones. Each component has its own list below: ImplicitModel, the ops,
ImplicitRNN, the attention head and SIM.
"""
import warnings

import numpy as np
import pytest
import torch

import idl
from custom_activations import Softsign
from idl import functional as F

ARGS = dict(input_dim=3, output_dim=2, hidden_dim=4)


def model(**kwargs):
    # seeded: whether an infinite input reaches X through relu depends on signs in B
    torch.manual_seed(0)
    return idl.ImplicitModel(**{**ARGS, **kwargs})


def test_rank_without_low_rank_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"rank=2 is ignored.*is_low_rank=True") as record:
        m = model(rank=2)
    assert record[0].filename == __file__  # points at the caller
    assert m.A.shape == (ARGS["hidden_dim"], ARGS["hidden_dim"]) and not hasattr(m, "L")


def call(U, X0=None, **kwargs):
    return lambda: model(**kwargs)(U, X0=X0)


def solve(A, C0, X0=None, activation="relu", max_iter=10, tol=1e-6):
    return lambda: torch.ops.idl.fixed_point(A, C0, X0, activation, 0.0, max_iter, tol, 10, 1e-6)


# seeded: a test's outcome must not depend on the order tests draw numbers in
_numbers = torch.Generator().manual_seed(0)
U = torch.randn(2, 3, generator=_numbers)
A4 = torch.randn(4, 4, generator=_numbers) * 0.1
META = dict(device="meta")

# (id, the bad call, exception type, words its message must contain)
IMPLICIT_MODEL_CASES = [
    ("kappa_nan", lambda: model(kappa=float("nan")), ValueError, "kappa"),
    ("kappa_inf", lambda: model(kappa=float("inf")), ValueError, "kappa"),
    ("kappa_bool", lambda: model(kappa=True), TypeError, "kappa"),
    ("input_dim_negative", lambda: model(input_dim=-3), ValueError, "input_dim"),
    ("output_dim_zero", lambda: model(output_dim=0), ValueError, "output_dim"),
    ("hidden_dim_negative", lambda: model(hidden_dim=-1), ValueError, "hidden_dim"),
    ("hidden_dim_bool", lambda: model(hidden_dim=True), TypeError, "hidden_dim"),
    ("rank_float", lambda: model(is_low_rank=True, rank=2.0), TypeError, "rank"),
    ("rank_negative", lambda: model(is_low_rank=True, rank=-1), ValueError, "rank"),
    ("grad_mitr_zero", lambda: model(grad_mitr=0), ValueError, "grad_mitr"),
    ("d_scale_zero", lambda: model(d_scale=0.0), ValueError, "d_scale"),
    ("d_scale_nan", lambda: model(d_scale=float("nan")), ValueError, "d_scale"),
    ("d_scale_str", lambda: model(d_scale="1"), TypeError, "d_scale"),
    ("mitr_beyond_int64", lambda: model(mitr=2**63), ValueError, "max_iter"),
    ("mitr_float", lambda: model(mitr=1.5), TypeError, "mitr"),
    ("tol_inf", lambda: model(tol=float("inf")), ValueError, "tol"),
    ("tol_str", lambda: model(tol="1e-3"), TypeError, "tol"),
    ("grad_tol_negative", lambda: model(grad_tol=-1.0), ValueError, "grad_tol"),
    ("negative_slope_nan", lambda: model(activation="leaky_relu", negative_slope=float("nan")),
     ValueError, "negative_slope"),
    ("negative_slope_str", lambda: model(activation="leaky_relu", negative_slope="0.1"),
     TypeError, "negative_slope"),
    ("negative_slope_steep", lambda: model(activation="leaky_relu", negative_slope=-1.5),
     ValueError, r"negative_slope must be in \[-1, 1\]"),
    ("f_instance", lambda: model(f=idl.ImplicitFunctionInf()), TypeError, "f must be"),
    ("activation_none", lambda: model(activation=None), ValueError, "activation"),
    ("projection_none", lambda: model(projection=None), ValueError, "projection"),
    ("U_numpy", call(U.numpy()), TypeError, "U must be a torch.Tensor"),
    ("U_scalar", call(torch.tensor(1.0)), ValueError, "U must have shape"),
    ("U_no_features", call(torch.zeros(2, 0)), ValueError, "input_dim=3"),
    ("U_flattens_wrong", call(torch.zeros(2, 2, 2)), ValueError, "input_dim=3"),
    ("U_complex", call(U.to(torch.complex64)), TypeError, "U has dtype"),
    ("half_model", lambda: model().half()(U.half()), TypeError, "float32 or float64"),
    ("X0_list", call(U, X0=[[0.0] * 4] * 2), TypeError, "X0"),
    ("X0_meta", call(U, X0=torch.zeros(2, 4, **META)), ValueError, "X0 is on meta"),
    ("X0_int", call(U, X0=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "X0 has dtype"),
    ("X0_transposed_shape", call(U, X0=torch.zeros(4, 2)), ValueError, "X0 must have shape"),
    ("X0_vector", call(U, X0=torch.zeros(4)), ValueError, "X0 must have shape"),
]

OPS_CASES = [
    ("project_3d", lambda: idl.project_linf(torch.randn(2, 2, 2), 0.5), ValueError, "A must be a 2-D"),
    ("project_int", lambda: idl.project_linf(torch.ones(2, 2, dtype=torch.int32), 0.5),
     TypeError, "A must be float32 or float64"),
    ("project_kappa_nan", lambda: idl.project_linf(A4, float("nan")), ValueError, "kappa"),
    ("project_mode_case", lambda: idl.project_linf(A4, 0.5, "EXACT"), ValueError, "projection"),
    ("project_op_kappa", lambda: torch.ops.idl.project_linf(A4, 1.5, "exact"), ValueError, "kappa"),
    ("project_backward_shape",
     lambda: torch.ops.idl.project_linf_backward(torch.ones(3, 3), A4, 0.5, "exact"),
     ValueError, "grad must have the shape"),
    ("project_backward_meta_grad",
     lambda: torch.ops.idl.project_linf_backward(torch.ones(4, 4, **META), A4, 0.5, "exact"),
     ValueError, "grad is on meta"),
    ("solve_X0_meta", solve(A4, torch.randn(2, 4), X0=torch.zeros(2, 4, **META)),
     ValueError, "X0 is on meta"),
    ("solve_A_meta", solve(A4.to("meta"), torch.randn(2, 4)), ValueError, "is on"),
    ("solve_meta_columns", solve(A4.to("meta"), torch.randn(2, 3, **META)), ValueError, "columns"),
    ("solve_activation_case", solve(A4, torch.randn(2, 4), activation="ReLU"),
     ValueError, "unknown activation"),
    ("solve_tol_nan", solve(A4, torch.randn(2, 4), tol=float("nan")), ValueError, "tol"),
    ("adjoint_G_shape",
     lambda: torch.ops.idl.fixed_point_adjoint(A4, torch.randn(2, 4), torch.randn(3, 4), "relu",
                                               0.0, 10, 1e-6),
     ValueError, "G must have shape"),
    ("adjoint_Z_meta",
     lambda: torch.ops.idl.fixed_point_adjoint(A4, torch.randn(2, 4, **META), torch.randn(2, 4),
                                               "relu", 0.0, 10, 1e-6),
     ValueError, "is on"),
    ("options_policy", lambda: F.SolverOptions(on_nonconvergence="error"), ValueError, "on_nonconvergence"),
    ("options_bool_iterations", lambda: F.SolverOptions(max_iter=True), TypeError, "max_iter"),
]

def rnn(**kwargs):
    return idl.ImplicitRNN(**{**dict(input_dim=1, output_dim=1, hidden_dim=3, implicit_hidden_dim=4), **kwargs})


def head(**kwargs):
    return idl.ImplicitAttentionHead(**{**dict(n_embd=4, head_size=2, block_size=5), **kwargs})


def sim(**kwargs):
    from idl.sim import SIM

    return SIM(**kwargs)


SEQ = torch.randn(2, 3, 1)
TOKENS = torch.randn(2, 3, 4)

IMPLICIT_RNN_CASES = [
    ("rnn_x_2d", lambda: rnn()(torch.randn(2, 3)), ValueError, "x must have shape"),
    ("rnn_x_wrong_features", lambda: rnn()(torch.randn(2, 3, 2)), ValueError, "input_dim=1"),
    ("rnn_x_no_steps", lambda: rnn()(torch.randn(2, 0, 1)), ValueError, "seq_len"),
    ("rnn_x_float64", lambda: rnn()(SEQ.double()), TypeError, "dtype"),
    ("rnn_h0_shape", lambda: rnn()(SEQ, torch.zeros(2, 4)), ValueError, "h0"),
    ("rnn_hidden_zero", lambda: rnn(hidden_dim=0), ValueError, "hidden_dim"),
    ("rnn_kappa_out_of_range", lambda: rnn(kappa=1.5), ValueError, "kappa"),
    ("rnn_rank_above_hidden", lambda: rnn(is_low_rank=True, rank=9), ValueError, "rank"),
]
ATTENTION_CASES = [
    ("head_tokens_too_long", lambda: head()(torch.randn(2, 6, 4)), ValueError, "block_size"),
    ("head_wrong_embedding", lambda: head()(torch.randn(2, 3, 5)), ValueError, "n_embd"),
    ("head_x_2d", lambda: head()(torch.randn(3, 4)), ValueError, "x must have shape"),
    ("head_x_list", lambda: head()([[0.0] * 4]), TypeError, "torch.Tensor"),
    ("head_attention_unknown", lambda: head(attention="linear"), ValueError, "attention"),
    ("head_feedback_unknown", lambda: head(feedback="some"), ValueError, "feedback"),
    ("head_solver_unknown", lambda: head(solver="newton"), ValueError, "solver"),
    ("head_kappa_zero", lambda: head(kappa=0.0), ValueError, "kappa"),
    ("head_size_zero", lambda: head(head_size=0), ValueError, "head_size"),
    ("multihead_indivisible", lambda: idl.ImplicitMultiHeadAttention(5, 2, 4), ValueError, "divisible"),
]
SIM_CASES = [
    ("sim_kappa_above_one", lambda: sim(kappa=1.01), ValueError, "kappa"),
    ("sim_atol_negative", lambda: sim(atol=-1.0), ValueError, "atol"),
    ("sim_activation_not_callable", lambda: sim(activation_fn="relu"), TypeError, "activation_fn"),
    ("sim_skip_layers_negative", lambda: sim(skip_layers=-1), ValueError, "skip_layers"),
    ("sim_dtype_integer", lambda: sim(dtype=torch.int32), TypeError, "dtype"),
    ("sim_max_iter_zero", lambda: sim(max_iter=0), ValueError, "max_iter"),
    ("sim_not_fitted", lambda: sim()(torch.randn(2, 3)), RuntimeError, "not fitted"),
    ("sim_solver_wrong_type", lambda: sim().train(solver="cvx", model=torch.nn.ReLU(), dataloader=[]),
     TypeError, "solver"),
    ("sim_model_without_loader", lambda: sim().train(model=torch.nn.Sequential(torch.nn.ReLU())),
     ValueError, "dataloader"),
]

CASES = IMPLICIT_MODEL_CASES + OPS_CASES + IMPLICIT_RNN_CASES + ATTENTION_CASES + SIM_CASES


def test_the_table_is_large_and_its_rows_distinct():
    assert len(CASES) >= 20
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("bad_call, error, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(bad_call, error, words):
    with pytest.raises(error, match=words):
        bad_call()


def test_sizes_whose_parameters_cannot_exist_raise_instead_of_crashing():
    with pytest.raises(RuntimeError, match="overflow"):
        model(hidden_dim=10**12)
    with pytest.raises(RuntimeError, match="overflow"):
        model(input_dim=2**62)


# ---- non-finite values: warned about by default, raised on request ------------


def poisoned(name, index, value, **kwargs):
    """A model whose parameter `name` holds `value` at `index`."""
    m = model(**kwargs)
    with torch.no_grad():
        getattr(m, name)[index] = value
    return m


NAN, INF = float("nan"), float("inf")

# (id, the model's settings, a function (settings) -> output, iterations).
# NaN or Inf in A or in the offsets U Bᵀ + b is found before the first
# iteration (0 iterations): a saturating φ, or ReLU units all dead, could hide
# it from the iterates. A poisoned X0 shows in the first iteration.
NON_FINITE_CASES = [
    ("U_inf", {}, lambda s: model(**s)(torch.tensor([[1.0, INF, 0.0]])), 0),
    ("U_nan_python_activation", {"f": None},
     lambda s: model(**s)(torch.tensor([[1.0, NAN, 0.0]])), 0),
    ("A_nan", {}, lambda s: poisoned("A", (0, 0), NAN, **s)(U), 0),
    ("A_inf", {}, lambda s: poisoned("A", (1, 2), INF, **s)(U), 0),
    ("A_inf_scale_projection", {"projection": "scale"},
     lambda s: poisoned("A", (1, 2), INF, **s)(U), 0),
    ("L_nan_low_rank", {"is_low_rank": True, "rank": 2},
     lambda s: poisoned("L", (0, 1), NAN, **s)(U), 0),
    ("B_nan", {}, lambda s: poisoned("B", (0, 0), NAN, **s)(U), 0),
    ("bias_hidden_inf", {"bias": True}, lambda s: poisoned("bias_hidden", 2, INF, **s)(U), 0),
    ("X0_nan", {}, lambda s: model(**s)(U, X0=torch.full((2, 4), NAN)), 1),
    # every ReLU unit dead (U = 0): the iterates never touch A
    ("A_nan_relu_dead_units", {}, lambda s: poisoned("A", (0, 0), NAN, **s)(torch.zeros(2, 3)), 0),
    ("A_nan_python_activation_dead_units", {"f": None},
     lambda s: poisoned("A", (0, 0), NAN, **s)(torch.zeros(2, 3)), 0),
    # saturating activations would map Inf pre-activations to finite states
    *[(f"A_inf_{act}_inference", {"activation": act},
       lambda s: _no_grad(poisoned("A", (1, 2), sign * INF, **s), U), 0)
      for act in ("tanh", "sigmoid", "hardtanh", "softplus") for sign in (1, -1)],
]


def _no_grad(module, U):
    with torch.no_grad():
        return module(U)


def settings_of(case_settings, policy):
    settings = {**case_settings, "on_nonconvergence": policy}
    if "f" in settings:
        settings["f"] = Softsign
    return settings


@pytest.mark.parametrize("settings, run, iterations", [c[1:] for c in NON_FINITE_CASES],
                         ids=[c[0] for c in NON_FINITE_CASES])
def test_non_finite_values_warn_by_default(settings, run, iterations):
    with pytest.warns(idl.ImplicitFunctionWarning,
                      match=rf"NaN or Inf.*iterations={iterations}, residual="):
        run(settings_of(settings, "warn"))


@pytest.mark.parametrize("settings, run, iterations", [c[1:] for c in NON_FINITE_CASES],
                         ids=[c[0] for c in NON_FINITE_CASES])
def test_non_finite_values_raise_on_request(settings, run, iterations):
    with pytest.raises(idl.SolveNotConverged, match=rf"NaN or Inf.*iterations={iterations}, residual="):
        run(settings_of(settings, "raise"))


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_non_finite_gradient_is_reported_by_the_backward_solve(policy):
    m = model(on_nonconvergence=policy, activation="tanh")
    out = m(U)
    grad = torch.full_like(out, NAN)
    if policy == "warn":
        with pytest.warns(idl.ImplicitFunctionWarning, match=r"backward.*NaN or Inf.*iterations=1"):
            out.backward(grad)
    else:
        with pytest.raises(idl.SolveNotConverged, match=r"backward.*NaN or Inf.*iterations=1"):
            out.backward(grad)
    assert m.last_stats.backward["converged"] is False


# ---- the non-convergence policy -------------------------------------------------


def slow_model(f=idl.ImplicitFunctionInf, **kwargs):
    """A model whose solves contract slowly (at rate 0.9): a few iterations
    leave a large residual."""
    torch.manual_seed(0)
    activation = "identity" if f is idl.ImplicitFunctionInf else "relu"
    m = model(f=f, kappa=0.9, activation=activation, **kwargs)
    with torch.no_grad():
        m.A.copy_(torch.full((4, 4), 1.0))  # projected to rows of 0.9 / 4
    return m


@pytest.mark.parametrize("f", [idl.ImplicitFunctionInf, Softsign], ids=["compiled", "python"])
def test_forward_limit_raises_with_iterations_and_residual(f):
    m = slow_model(f=f, mitr=5, tol=1e-12, on_nonconvergence="raise")
    with pytest.raises(idl.SolveNotConverged, match=r"forward.*limit.*iterations=5, residual=\d"):
        m(U)
    assert m.last_stats.forward == dict(m.last_stats.forward, iterations=5, converged=False)
    assert m.last_stats.forward["residual"] > 1e-12


@pytest.mark.parametrize("f", [idl.ImplicitFunctionInf, Softsign], ids=["compiled", "python"])
def test_backward_limit_raises_with_iterations_and_residual(f):
    m = slow_model(f=f, mitr=5000, tol=1e-12, grad_mitr=3, grad_tol=1e-12, on_nonconvergence="raise")
    out = m(U)
    assert m.last_stats.forward["converged"]
    with pytest.raises(idl.SolveNotConverged, match=r"backward.*limit.*iterations=3, residual=\d"):
        out.sum().backward()
    assert m.last_stats.backward["iterations"] == 3 and not m.last_stats.backward["converged"]


def test_the_warning_is_a_runtime_warning_users_can_filter_or_escalate():
    m = slow_model(mitr=5, tol=1e-12)
    assert issubclass(idl.ImplicitFunctionWarning, RuntimeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        with pytest.raises(idl.ImplicitFunctionWarning, match="iterations=5"):
            m(U)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        out = m(U)  # the result of the last iteration, still returned
    assert torch.isfinite(out).all()


def test_a_converged_solve_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = model(on_nonconvergence="raise")
        m(U).sum().backward()
    assert m.last_stats.forward["converged"] and m.last_stats.backward["converged"]


def test_an_unconverged_result_is_never_passed_off_as_converged():
    """Whatever the policy, the stats say what happened."""
    for policy in ("warn", "raise"):
        m = slow_model(mitr=2, tol=0.0, on_nonconvergence=policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
            try:
                m(U)
            except idl.SolveNotConverged:
                pass
        assert m.last_stats.forward["converged"] is False


def test_numpy_scalars_are_fine_settings():
    """Not everything unusual is an error: numpy floats and ints work."""
    m = model(kappa=np.float64(0.5), tol=np.float64(1e-6), negative_slope=np.float64(0.1),
              activation="leaky_relu")
    assert m(U).shape == (2, 2)
