"""idl::implicit_layer, the whole ImplicitModel forward as one op with its
backward in C++: against the float64 reference and the composition of the
single ops, opcheck, gradcheck, its stats report and its argument checks."""
import ctypes
import os
import warnings

import pytest
import torch

import idl
from reference import picard, project_rows_l1, project_scale
from stats_opcheck import opcheck_with_stats

ops = torch.ops.idl
SOLVER = (5000, 1e-13, 5000, 1e-13, "picard", 5)  # max_iter, tol, grad_max_iter, grad_tol, method, memory
N, P, Q, M = 5, 3, 2, 4  # hidden, input, output, batch


def layer_inputs(seed=0, D=True, bias=True, X0=False, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        x = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
        return x.requires_grad_(requires_grad)

    return dict(
        U=t(M, P), A=t(N, N, scale=0.8), B=t(N, P), C=t(Q, N),
        D=t(Q, P) if D else None, bias_hidden=t(N) if bias else None,
        bias_out=t(Q) if bias else None,
        X0=torch.randn(M, N, generator=g, dtype=torch.float64) if X0 else None,
    )


def call(inputs, well_posed="exact", activation="tanh", kappa=0.9, solver=SOLVER, d_scale=1.0):
    """(Y, stats) of the op: its X is checked through the model's implicit_state."""
    i = inputs
    Y, _X, stats = ops.implicit_layer(i["U"], i["A"], i["B"], i["C"], i["D"], i["bias_hidden"],
                                      i["bias_out"], i["X0"], well_posed, kappa, activation, 0.1,
                                      *solver, d_scale=d_scale)
    return Y, stats


def reference(inputs, well_posed, activation, kappa=0.9, d_scale=1.0):
    i = {k: (v.detach() if v is not None else None) for k, v in inputs.items()}
    A = {"none": lambda A: A, "triu": lambda A: torch.triu(A, 1),
         "exact": lambda A: project_rows_l1(A, kappa), "scale": lambda A: project_scale(A, kappa)}[well_posed](i["A"])
    C0 = i["U"] @ i["B"].T + (0 if i["bias_hidden"] is None else i["bias_hidden"])
    X = picard(A, C0, activation, slope=0.1)
    Y = X @ i["C"].T + (0 if i["D"] is None else d_scale * (i["U"] @ i["D"].T))
    return Y + (0 if i["bias_out"] is None else i["bias_out"])


WELL_POSED = ["none", "triu", "exact", "scale"]


@pytest.mark.parametrize("well_posed", WELL_POSED)
@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_output_matches_reference(well_posed, activation):
    inputs = layer_inputs()
    if well_posed == "none":  # A as is must be a contraction on its own
        inputs["A"] = project_rows_l1(inputs["A"].detach(), 0.8).requires_grad_()
    Y, stats = call(inputs, well_posed, activation)
    torch.testing.assert_close(Y, reference(inputs, well_posed, activation), atol=1e-11, rtol=0)
    assert stats[0, 2] == 1.0 and stats[0, 1] <= 1e-13
    assert stats[1].tolist() == [-1.0, 0.0, 0.0]  # the backward row: not run yet


def test_d_scale_scales_the_skip_path_and_its_gradients():
    """Y = X Cᵀ + d_scale U Dᵀ + b: the output against the reference, and
    gradcheck (dL/dD and dL/dU carry the factor)."""
    inputs = layer_inputs()
    Y, _ = call(inputs, d_scale=0.3)
    torch.testing.assert_close(Y, reference(inputs, "exact", "tanh", d_scale=0.3), atol=1e-11, rtol=0)
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]

    def f(*tensors):
        return call({**inputs, **dict(zip(names, tensors))}, d_scale=0.3)[0]

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in names))
    with pytest.raises(ValueError, match="d_scale must be finite"):
        call(inputs, d_scale=float("inf"))


@pytest.mark.parametrize("well_posed", WELL_POSED)
@pytest.mark.parametrize("optional", ["all", "no_D", "no_bias", "X0"])
def test_gradcheck(well_posed, optional):
    inputs = layer_inputs(D=optional != "no_D", bias=optional != "no_bias", X0=optional == "X0")
    if well_posed == "none":
        inputs["A"] = project_rows_l1(inputs["A"].detach(), 0.8).requires_grad_()
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]

    def f(*tensors):
        return call({**inputs, **dict(zip(names, tensors))}, well_posed)[0]

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in names))


def test_gradients_only_for_inputs_that_need_them():
    inputs = layer_inputs(requires_grad=False)
    inputs["C"].requires_grad_()
    call(inputs)[0].sum().backward()
    assert inputs["C"].grad is not None
    assert all(inputs[k].grad is None for k in ("U", "A", "B", "D", "bias_hidden", "bias_out"))


@pytest.mark.parametrize("optional", ["all", "none_given"])
def test_opcheck(optional):
    inputs = layer_inputs(D=optional == "all", bias=optional == "all", X0=optional == "all")
    i = inputs
    args = (i["U"], i["A"], i["B"], i["C"], i["D"], i["bias_hidden"], i["bias_out"], i["X0"],
            "exact", 0.9, "tanh", 0.1, *SOLVER, 0.0, 0.0, "implicit", 5, 0.5, "warn", 0.3)
    opcheck_with_stats(ops.implicit_layer.default, args, stats_index=2)


@pytest.mark.parametrize("given", ["bias_hidden", "bias_out"])
def test_one_bias_alone(given):
    """Every combination of the optional inputs: one bias without the other
    gets its gradient (an index out of range, or None, before)."""
    inputs = layer_inputs()
    inputs["bias_out" if given == "bias_hidden" else "bias_hidden"] = None
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]

    def f(*tensors):
        return call({**inputs, **dict(zip(names, tensors))})[0]

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in names))
    call(inputs)[0].sum().backward()
    assert inputs[given].grad is not None


def test_state_output_and_its_gradient():
    """The op's X is the equilibrium, and a loss on X (alone, or with Y) has
    the exact gradient."""
    inputs = layer_inputs()
    i = inputs
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]

    def f(*tensors):
        j = {**inputs, **dict(zip(names, tensors))}
        Y, X, _ = ops.implicit_layer(j["U"], j["A"], j["B"], j["C"], j["D"], j["bias_hidden"],
                                     j["bias_out"], None, "exact", 0.9, "tanh", 0.1, *SOLVER)
        return X, Y

    X, _ = f(*(inputs[k] for k in names))
    A = project_rows_l1(i["A"].detach(), 0.9)
    C0 = i["U"].detach() @ i["B"].detach().T + i["bias_hidden"].detach()
    torch.testing.assert_close(X, picard(A, C0, "tanh"), atol=1e-11, rtol=0)
    assert torch.autograd.gradcheck(lambda *t: f(*t)[0], tuple(inputs[k] for k in names))
    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in names))


def test_double_backward_through_the_state_is_exact():
    """A second derivative that runs through X (here d/dB of ||dL/dC||²) is
    exact: X is an output of the op, not a constant of its backward. It used
    to come out silently wrong."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(3, 2, 4, tol=1e-13, grad_tol=1e-13, mitr=5000, grad_mitr=5000).double()
    U = torch.randn(5, 3, dtype=torch.float64)

    def second(forward):
        (grad_C,) = torch.autograd.grad((forward() ** 2).sum(), model.C, create_graph=True)
        return torch.autograd.grad((grad_C ** 2).sum(), model.B)[0]

    def unrolled():  # backpropagation through a converged Picard loop
        A, X = model.effective_A(), torch.zeros(5, 4, dtype=torch.float64)
        for _ in range(3000):
            X = torch.relu(X @ A.T + U @ model.B.T)
        return X @ model.C.T + U @ model.D.T

    torch.testing.assert_close(second(lambda: model(U)), second(unrolled), atol=1e-9, rtol=0)


def test_double_backward_through_the_adjoint_is_refused():
    """A second derivative through the adjoint solve is not computed: a
    clear error, never a silently wrong number."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(3, 2, 4).double()
    U = torch.randn(5, 3, dtype=torch.float64)
    (grad_B,) = torch.autograd.grad(model(U).square().sum(), model.B, create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        torch.autograd.grad(grad_B.square().sum(), model.C)


def test_model_forward_is_the_composition_of_the_single_ops():
    """ImplicitModel.forward takes the one op; readout(implicit_state) takes
    the single ops: same values, same gradients."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(P, Q, N, bias=True, mitr=5000, grad_mitr=5000, tol=1e-13, grad_tol=1e-13).double()
    with torch.no_grad():
        model.A.mul_(8)
    U = torch.randn(M, P, dtype=torch.float64)
    fused = model(U)
    fused.square().sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    composed = model.readout(U, model.implicit_state(U))
    composed.square().sum().backward()
    torch.testing.assert_close(fused, composed, atol=1e-12, rtol=0)
    for got, want in zip(fused_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=0)


def test_backward_fills_the_stats():
    inputs = layer_inputs()
    Y, stats = call(inputs)
    assert stats.shape == (2, 3) and stats.dtype == torch.float64
    assert stats[1].tolist() == [-1.0, 0.0, 0.0]  # not run until the backward pass
    Y.sum().backward()
    iterations, residual, converged = stats[1].tolist()
    assert iterations >= 1 and residual <= 1e-13 and converged == 1.0


@pytest.mark.parametrize("policy, expectation", [
    ("warn", pytest.warns(idl.ImplicitFunctionWarning, match=r"backward.*iterations=1")),
    ("raise", pytest.raises(idl.SolveNotConverged, match=r"backward.*iterations=1")),
])
def test_backward_nonconvergence_follows_the_policy(policy, expectation):
    """The model reports the backward row of its stats as it asked, once the
    backward pass has written it."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(P, Q, N, activation="tanh", grad_mitr=1, grad_tol=0.0,
                              on_nonconvergence=policy).double()
    Y = model(torch.randn(M, P, dtype=torch.float64))
    with expectation:
        Y.sum().backward()
    assert model.last_stats.backward["iterations"] == 1


def mkl_max_threads():
    """MKL's thread count for the calling thread (None without MKL)."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not (torch.backends.mkl.is_available() and os.path.exists(path)):
        return None
    get = ctypes.CDLL(path).MKL_Get_Max_Threads
    get.restype = ctypes.c_int
    return get()


@pytest.mark.skipif(mkl_max_threads() is None, reason="MKL's thread setting (x86 Linux builds)")
@pytest.mark.parametrize("batch, threads_inside", [(4, 1), (64, 2)])
def test_small_layers_run_mkl_on_one_thread(monkeypatch, batch, threads_inside):
    """Seen from inside the backward (a stand-in adjoint kernel that the
    layer calls through the dispatcher): one thread for a layer whose largest
    product is below 2^18 multiply-adds (4 x 64 x 64), all for one at it
    (64 x 64 x 64); and as before afterwards."""
    seen = []

    def adjoint_that_looks(A, Z, G, activation, slope, max_iter, tol, method="picard", memory=5):
        seen.append(mkl_max_threads())
        return torch.zeros_like(Z), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    lib = torch.library.Library("idl", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            lib.impl("fixed_point_adjoint", adjoint_that_looks, "CPU")
        g = torch.Generator().manual_seed(0)
        U, A, B = (torch.randn(*shape, generator=g) for shape in [(batch, 64), (64, 64), (64, 64)])
        C = torch.randn(2, 64, generator=g, requires_grad=True)
        Y, _X, _stats = ops.implicit_layer(U, A, B, C, None, None, None, None, "scale", 0.9, "tanh",
                                           0.0, 300, 1e-4, 300, 1e-4, "picard", 5)
        Y.sum().backward()
        assert seen == [threads_inside] and mkl_max_threads() == 2
    finally:
        lib._destroy()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("change, message", [
    (dict(well_posed="project"), "well_posed must be"),
    (dict(kappa=1.5), "kappa must be in"),
    (dict(B=torch.zeros(N, P + 1, dtype=torch.float64)), "B must have shape"),
    (dict(C=torch.zeros(Q, N + 1, dtype=torch.float64)), "C must have 5 columns"),
    (dict(D=torch.zeros(Q + 1, P, dtype=torch.float64)), "D must have shape"),
    (dict(bias_hidden=torch.zeros(N + 1, dtype=torch.float64)), "bias_hidden must have shape"),
    (dict(U=torch.zeros(M, P)), "U has dtype"),
])
def test_bad_arguments_name_themselves(change, message):
    inputs = layer_inputs()
    settings = {k: change.pop(k) for k in ("well_posed", "kappa") if k in change}
    inputs.update(change)
    with pytest.raises(ValueError if "dtype" not in message else TypeError, match=message):
        call(inputs, **settings)
