"""Regression tests of defects found in review (each failed before its fix):
compile and export for every batch size, parametrised weights, the attention
ops' argument checks and empty batches, torch.func transforms, and clearer
errors (numpy numbers, dtype hints, autocast of a double model). The other
items have their tests beside the code they cover (test_implicit_layer.py,
test_bad_inputs.py, test_integration.py, test_install.py, test_projection.py,
test_sim*.py)."""
import numpy as np
import pytest
import torch
from torch.nn.utils import parametrizations, parametrize, prune

import idl
from idl._ops import attention_adjoint, attention_solve


# ---- one graph for every batch size ------------------------------------------


def test_compile_dynamic_traces_once_for_every_batch_size():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = idl.ImplicitModel(3, 2, 4)
    counter = CompileCounter()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=counter)
    for batch in range(2, 14):  # more sizes than dynamo's recompile limit (8)
        U = torch.randn(batch, 3, requires_grad=True)
        compiled(U).sum().backward()
        torch.testing.assert_close(compiled(U), model(U))
    assert counter.frame_count == 1


def test_export_with_a_dynamic_batch_dimension():
    model = idl.ImplicitModel(3, 2, 4)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(5, 3),), dynamic_shapes={"U": {0: batch}})
    U = torch.randn(9, 3)
    torch.testing.assert_close(program.module()(U), model(U))


# ---- parametrised weights -----------------------------------------------------


def _spectral(model):
    parametrizations.spectral_norm(model, "A")


def _custom(model):
    class Halved(torch.nn.Module):
        def forward(self, X):
            return X / 2

    parametrize.register_parametrization(model, "B", Halved())


def _pruned(model):
    prune.l1_unstructured(model, "A", amount=0.5)


def _weight_norm(model):
    parametrizations.weight_norm(model, "C")


def _buffer(model):
    A = model.A.detach().clone()
    del model.A
    model.register_buffer("A", A)


@pytest.mark.parametrize("wrap", [_spectral, _custom, _pruned, _weight_norm, _buffer],
                         ids=["spectral_norm", "register_parametrization", "prune", "weight_norm", "buffer"])
def test_parametrised_weights_are_read_through_the_attribute(wrap):
    """The layer reads A, B, C as the module gives them (KeyError: 'A'
    before); its output is that of a plain model holding those tensors."""
    torch.manual_seed(0)
    model = idl.ImplicitModel(3, 2, 4).double()
    wrap(model)
    U = torch.randn(5, 3, dtype=torch.float64)
    out = model(U)
    plain = idl.ImplicitModel(3, 2, 4).double()
    with torch.no_grad():
        for name in "ABCD":
            getattr(plain, name).copy_(getattr(model, name))
    torch.testing.assert_close(out, plain(U))
    out.sum().backward()  # gradients reach whatever the parametrisation holds


# ---- the attention ops ---------------------------------------------------------


def attention_args(**change):
    args = dict(A=0.1 * torch.randn(6, 8), C0=torch.randn(2, 3, 6), attention="softmax", max_iter=50,
                tol=1e-5, grad_max_iter=50, grad_tol=1e-5, method="picard", memory=5)
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, words", [
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(max_iter=-1), ValueError, "max_iter"),
    (dict(tol=float("nan")), ValueError, "tol"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(grad_max_iter=0), ValueError, "grad_max_iter"),
    (dict(method="newton"), ValueError, "solver"),
    (dict(memory=1000), ValueError, "memory"),
    (dict(attention="cosine"), ValueError, "attention must be one of"),
    (dict(A=0.1 * torch.randn(6, 8, device="meta")), ValueError, "is on (cpu|meta) but"),
    (dict(A=0.1 * torch.randn(6, 8, dtype=torch.float64)), TypeError, "dtype"),
])
def test_attention_solve_checks_its_arguments(change, error, words):
    with pytest.raises(error, match=words):
        attention_solve(**attention_args(**change))


def test_attention_adjoint_checks_its_arguments():
    args = attention_args()
    X, _ = attention_solve(**args)
    with pytest.raises(ValueError, match="is on meta but"):
        attention_adjoint(args["A"], args["C0"], X, torch.empty(X.shape, device="meta"), "softmax",
                          50, 1e-5, "picard", 5)
    with pytest.raises(ValueError, match="memory"):
        attention_adjoint(args["A"], args["C0"], X, torch.ones_like(X), "softmax", 50, 1e-5, "anderson", 99)


def test_attention_head_backward_on_an_empty_batch():
    head = idl.ImplicitAttentionHead(4, 2, 3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    head(x).sum().backward()
    assert x.grad.shape == (0, 3, 4) and head.B.grad.abs().sum() == 0


# ---- torch.func ------------------------------------------------------------------


@pytest.mark.parametrize("transform, name", [
    (lambda m, U: torch.func.vmap(m)(U.unsqueeze(1)), "vmap"),
    (lambda m, U: torch.func.grad(lambda u: m(u).sum())(U), "grad"),
    (lambda m, U: torch.func.jacrev(m)(U), "grad"),
])
def test_function_transforms_are_refused_clearly(transform, name):
    """A clear error naming the transform, rather than torch's about C++
    autograd functions or data pointers."""
    model = idl.ImplicitModel(3, 2, 4)
    with pytest.raises(NotImplementedError, match=rf"ImplicitModel does not support torch.func.*{name}"):
        transform(model, torch.randn(5, 3))


def test_attention_refuses_function_transforms_clearly():
    head = idl.ImplicitAttentionHead(4, 2, 3)
    with pytest.raises(NotImplementedError, match="ImplicitAttentionHead does not support torch.func"):
        torch.func.grad(lambda x: head(x).sum())(torch.randn(1, 3, 4))


# ---- clearer errors ---------------------------------------------------------------


def test_numpy_numbers_are_accepted_as_nn_linear_accepts_them():
    model = idl.ImplicitModel(np.prod((8, 8)), np.int64(10), 32, kappa=np.float32(0.9), mitr=np.int64(100),
                              tol=np.float64(1e-5), negative_slope=np.float32(0.1))
    assert (model.input_dim, model.output_dim, model.mitr) == (64, 10, 100)
    assert type(model.input_dim) is int and type(model.mitr) is int
    assert model(torch.randn(2, 64)).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_input_gets_a_floating_point_hint(dtype):
    model = idl.ImplicitModel(3, 2, 4)
    with pytest.raises(TypeError, match=r"floating point.*U\.to\(torch\.float32\)"):
        model(torch.ones(2, 3, dtype=dtype))


def test_float32_input_to_a_double_model_under_bfloat16_autocast():
    """The layer runs in its parameters' dtype (a raw GEMM dtype error
    before), forward and backward."""
    model = idl.ImplicitModel(3, 2, 4).double()
    U = torch.randn(5, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(U)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert U.grad.dtype == torch.float32 and model.A.grad is not None
