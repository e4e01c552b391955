"""torch.compile(fullgraph=True) of networks that contain ImplicitModel: the
same outputs and gradients as eager mode.

The gradient comparison runs on the aot_eager backend (dynamo + AOTAutograd,
the whole tracing stack, without inductor's code generation, which takes about
a minute on a small CPU); one inductor test is marked slow.
"""
import pytest
import torch

import idl
from custom_activations import Softsign
from stats_opcheck import opcheck_with_stats

# A few idl layers with different settings between ordinary layers, so one
# compilation covers projection modes, low rank, biases and activations.
LAYERS = [
    dict(bias=True),
    dict(is_low_rank=True, rank=3, projection="scale", activation="tanh", no_D=True),
    dict(f=idl.ImplicitFunctionTriu, activation="leaky_relu", negative_slope=0.2),
]
TIGHT = dict(mitr=2000, grad_mitr=2000, tol=1e-12, grad_tol=1e-12)


def make_network(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 6),
        torch.nn.Tanh(),
        idl.ImplicitModel(6, 7, 8, **TIGHT, **LAYERS[0]),
        idl.ImplicitModel(7, 4, 6, **TIGHT, **LAYERS[1]),
        torch.nn.ReLU(),
        idl.ImplicitModel(4, 3, 5, **TIGHT, **LAYERS[2]),
        torch.nn.Linear(3, 2),
    )
    with torch.no_grad():  # make the projections active
        for layer in net:
            for name in ("A", "L", "R"):
                if hasattr(layer, name):
                    getattr(layer, name).mul_(6)
    return net.double()


def outputs_and_grads(net, U):
    net.zero_grad()
    U = U.detach().clone().requires_grad_(True)
    out = net(U)
    out.square().mean().backward()
    return [out.detach(), U.grad] + [p.grad for p in net.parameters()]


def assert_same_as_eager(backend, batches):
    net = make_network()
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    for U in batches:
        want = outputs_and_grads(net, U)
        got = outputs_and_grads(compiled, U)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_fullgraph_aot_eager_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    # the second batch has another size: a recompilation (or a dynamic shape)
    batches = [torch.randn(7, 5, generator=g, dtype=torch.float64),
               torch.randn(3, 5, generator=g, dtype=torch.float64)]
    assert_same_as_eager("aot_eager", batches)


@pytest.mark.slow
def test_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()
    U = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_as_eager("inductor", [U])


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_fake_kernels_agree_with_the_real_ones_on_non_contiguous_inputs(layout):
    """torch.compile plans memory from the fake kernels: for non-contiguous
    inputs they must promise the contiguous outputs the real kernels return
    (inductor otherwise stops on a stride assertion)."""
    g = torch.Generator().manual_seed(3)

    def view(rows, cols):
        if layout == "transposed":
            return torch.randn(cols, rows, generator=g, dtype=torch.float64).t()
        return torch.randn(rows, 2 * cols, generator=g, dtype=torch.float64)[:, ::2]

    A = idl.project_linf(view(4, 4), 0.5)
    C0, X0, G = view(3, 4), view(3, 4), view(3, 4)
    assert not C0.is_contiguous()
    ops = torch.ops.idl
    torch.library.opcheck(ops.project_linf.default, (view(4, 4), 0.5, "exact"))
    torch.library.opcheck(ops.project_linf_backward.default, (view(4, 4), A, 0.5, "exact"))
    torch.library.opcheck(ops.fixed_point.default,
                          (A.requires_grad_(), C0.requires_grad_(), X0, "tanh", 0.0, 500, 1e-12,
                           500, 1e-12))
    _, Z, _ = ops.fixed_point(A.detach(), C0.detach(), None, "tanh", 0.0, 500, 1e-12, 500, 1e-12)
    torch.library.opcheck(ops.fixed_point_adjoint.default,
                          (A.detach().t(), Z.t().contiguous().t(), G, "tanh", 0.0, 500, 1e-12))


def test_compiled_warm_start_and_implicit_state():
    torch._dynamo.reset()
    model = idl.ImplicitModel(4, 2, 6, **TIGHT).double()
    U = torch.randn(5, 4, dtype=torch.float64)
    X0 = model.implicit_state(U).detach()

    def both(U, X0):
        return model.implicit_state(U), model(U, X0=X0)

    got = torch.compile(both, backend="aot_eager", fullgraph=True)(U, X0)
    want = both(U, X0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_compiled_call_leaves_no_stale_stats():
    """A compiled graph cannot report its solves back to Python: last_stats is
    None after a compiled call rather than the stats of an older eager call."""
    torch._dynamo.reset()
    model = idl.ImplicitModel(4, 2, 6)
    U = torch.randn(5, 4)
    model(U)
    assert model.last_stats is not None
    torch.compile(model, backend="aot_eager", fullgraph=True)(U)
    assert model.last_stats is None


def test_python_activation_is_refused_by_fullgraph_not_miscompiled():
    """A user phi/dphi runs a data-dependent Python loop: fullgraph=True must
    fail loudly rather than trace something else."""
    torch._dynamo.reset()
    model = idl.ImplicitModel(3, 2, 4, f=Softsign)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(model, backend="aot_eager", fullgraph=True)(torch.randn(2, 3))


@pytest.mark.parametrize("attention, feedback", [("softmax", "values"), ("lipschitz", "full")])
def test_attention_fullgraph_matches_eager(attention, feedback):
    """The attention head's solve and its adjoint are custom ops: a network
    around heads compiles whole, with eager's outputs and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        idl.ImplicitMultiHeadAttention(8, 2, block_size=5, attention=attention, feedback=feedback,
                                       bias=True, **TIGHT),
        torch.nn.Linear(8, 3),
    ).double()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for T in (5, 3):  # a second length: a recompilation (or a dynamic shape)
        x = torch.randn(2, T, 6, dtype=torch.float64)
        want = outputs_and_grads(net, x)
        got = outputs_and_grads(compiled, x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


def test_attention_ops_opcheck():
    from idl.attention import attention_solve

    g = torch.Generator().manual_seed(5)
    A = 0.1 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    C0 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    settings = ("softmax", 500, 1e-12, 500, 1e-12, "picard", 5)
    opcheck_with_stats(torch.ops.idl.attention_solve.default,
                       (A.requires_grad_(), C0.requires_grad_(), *settings), stats_index=1)
    X, _ = attention_solve(A.detach(), C0.detach(), *settings)
    G = torch.randn(X.shape, generator=g, dtype=torch.float64)
    args = (A.detach(), C0.detach(), X, G, "softmax", 500, 1e-12, "picard", 5)
    # opcheck's other tests run the kernel under modes that cannot look inside
    # torch.func's wrappers, which the adjoint uses for its VJPs. Checked here
    # instead: no input mutated, the fake kernel against the real one; the
    # compiled backward in test_attention_fullgraph_matches_eager.
    before = [t.clone() for t in args[:4]]
    torch.library.opcheck(torch.ops.idl.attention_adjoint.default, args,
                          test_utils="test_autograd_registration")
    for t, b in zip(args[:4], before):
        assert torch.equal(t, b)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in args[:4]]
        fake_out = torch.ops.idl.attention_adjoint(*fakes, *args[4:])
    real_out = torch.ops.idl.attention_adjoint(*args)
    for f, r in zip(fake_out, real_out):
        assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride())
