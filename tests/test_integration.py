"""ImplicitModel next to the other parts of a training stack: mixed precision
(torch.autocast), meta-device initialisation, inference mode, and
create_graph=True (gradient penalties), which must work or fail clearly."""
import warnings

import pytest
import torch

import idl
from custom_activations import Softsign


VARIANTS = {
    "default": dict(),
    "low_rank": dict(is_low_rank=True, rank=3),
    "bias_tanh": dict(bias=True, activation="tanh"),
    "python_activation": dict(f=Softsign),
}


def network(seed=0, **settings):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), idl.ImplicitModel(6, 3, 8, **settings),
                               torch.nn.Linear(3, 2))


def loss_and_grads(net, U):
    net.zero_grad()
    out = net(U)
    loss = out.float().square().mean()
    loss.backward()
    return out, {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("settings", VARIANTS.values(), ids=VARIANTS.keys())
def test_autocast_bfloat16_trains_and_stays_close_to_float32(settings):
    """Under autocast the products around the solve run in bfloat16, the solve
    itself in the parameters' float32 (its tolerance needs it)."""
    net = network(**settings)
    U = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    out32, grads32 = loss_and_grads(net, U)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16, grads16 = loss_and_grads(net, U)
    assert out16.dtype == torch.bfloat16
    stats = net[1].last_stats
    assert stats.forward["converged"] and stats.backward["converged"]
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32, name
        scale = grads32[name].abs().max().item()
        torch.testing.assert_close(grad, grads32[name], atol=5e-2 * scale, rtol=0)


def test_autocast_accepts_low_precision_warm_starts():
    model = idl.ImplicitModel(5, 3, 8)
    U = torch.randn(4, 5)
    X = model.implicit_state(U).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(U.bfloat16(), X0=X.bfloat16())
    assert out.dtype == torch.bfloat16 and model.last_stats.forward["converged"]
    with pytest.raises(TypeError, match="U has dtype"):  # outside autocast: as before
        model(U.bfloat16())


def test_autocast_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    net = network()
    U = torch.randn(6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(U)
        got = torch.compile(net, backend="aot_eager", fullgraph=True)(U)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_meta_device_model_gives_shapes_without_data():
    model = idl.ImplicitModel(5, 3, 8, bias=True).to("meta")
    out = model(torch.empty(7, 5, device="meta"))
    assert out.shape == (7, 3) and out.device.type == "meta"
    assert model.last_stats.forward is None  # nothing to read on meta


@pytest.mark.parametrize("f", [idl.ImplicitFunctionInf, Softsign], ids=["compiled", "python_activation"])
def test_meta_device_model_runs_its_backward(f):
    """Forward and backward on meta give shapes (they used to fail copying
    stats out of meta, or reading a value with .item())."""
    model = idl.ImplicitModel(5, 3, 8, bias=True, f=f).to("meta")
    U = torch.empty(7, 5, device="meta", requires_grad=True)
    model(U).sum().backward()
    assert U.grad.shape == (7, 5) and U.grad.device.type == "meta"
    assert all(p.grad.shape == p.shape for p in model.parameters())


def test_fake_tensor_backward():
    """Under FakeTensorMode (shape propagation, as torch.compile's tracing
    does it) the backward runs too: no data is ever read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = idl.ImplicitModel(5, 3, 8, bias=True)
        U = torch.empty(7, 5, requires_grad=True)
        model(U).sum().backward()
        assert U.grad.shape == (7, 5) and model.A.grad.shape == (8, 8)


@pytest.mark.parametrize("settings", [dict(), dict(is_low_rank=True, rank=2, no_D=True)],
                         ids=["default", "low_rank_no_D"])
def test_meta_initialisation_then_to_empty_and_load(settings):
    """Large-model loading: build on meta, materialise, load the weights."""
    source = idl.ImplicitModel(5, 3, 8, **settings)
    with torch.device("meta"):
        target = idl.ImplicitModel(5, 3, 8, **settings)
    target = target.to_empty(device="cpu")
    target.load_state_dict(source.state_dict())
    U = torch.randn(4, 5)
    torch.testing.assert_close(target(U), source(U), atol=0, rtol=0)


def test_inference_mode():
    model = idl.ImplicitModel(5, 3, 8)
    U = torch.randn(4, 5)
    want = model(U).detach()
    with torch.inference_mode():
        got = model(U)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert model.last_stats.forward["converged"]


def test_the_backward_ops_refuse_to_be_differentiated():
    """Used directly, with inputs that require grad, they run (torch's
    fallback made the adjoint's GEMM fail) and a backward through them raises
    (the fallback returned no gradient, with a warning)."""
    A = (torch.eye(3) * 0.5).requires_grad_(True)
    Z, G = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True)
    V, _ = torch.ops.idl.fixed_point_adjoint(A, Z, G, "tanh", 0.0, 100, 1e-6)
    with pytest.raises(NotImplementedError, match="fixed_point_adjoint is not differentiable"):
        V.sum().backward()
    grad = torch.ones(3, 3, requires_grad=True)
    out = torch.ops.idl.project_linf_backward(grad, A.detach() * 4, 0.5, "exact")
    with pytest.raises(NotImplementedError, match="project_linf_backward is not differentiable"):
        out.sum().backward()


def test_create_graph_gives_first_derivatives_and_refuses_second_ones():
    """Gradient penalties differentiate gradients: the implicit backward is
    differentiable once, so the first derivatives come out right and the
    second ones raise instead of silently missing the solve's part."""
    model = idl.ImplicitModel(5, 3, 8, activation="tanh", tol=1e-12, grad_tol=1e-12).double()
    U = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(model(U).square().sum(), U)
    (got,) = torch.autograd.grad(model(U).square().sum(), U, create_graph=True)
    torch.testing.assert_close(got.detach(), want, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="fixed_point_adjoint is not differentiable"):
        got.square().sum().backward()
    python_path = idl.ImplicitModel(5, 3, 8, f=Softsign, tol=1e-12, grad_tol=1e-12).double()
    (want,) = torch.autograd.grad(python_path(U).square().sum(), U)
    (got,) = torch.autograd.grad(python_path(U).square().sum(), U, create_graph=True)
    torch.testing.assert_close(got.detach(), want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        got.square().sum().backward()
    A = (torch.randn(4, 4, dtype=torch.float64) * 3).requires_grad_(True)
    (grad_A,) = torch.autograd.grad(idl.project_linf(A, 0.5).square().sum(), A, create_graph=True)
    with pytest.raises(NotImplementedError, match="project_linf_backward is not differentiable"):
        grad_A.sum().backward()
