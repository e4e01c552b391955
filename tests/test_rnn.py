"""ImplicitRNNCell and ImplicitRNN against a plain-torch reference."""
import pytest
import torch
from torch.func import functional_call

import idl
from idl import ImplicitRNN, ImplicitRNNCell
from reference import project_rows_l1

TIGHT = dict(tol=1e-12, grad_tol=1e-12, mitr=2000, grad_mitr=2000)


def reference_rnn(x, h0, A, B, C, D, b_hidden, b_out, d_scale, kappa=0.99, iterations=3000):
    """Independent implementation: per step, Picard on
    X = relu(X Aᵀ + U Bᵀ + b_hidden) from zero (a fixed number of plain
    iterations, with A projected by a sort-based l1-ball projection), then
    h = X Cᵀ + d_scale U Dᵀ + b_out."""
    A = project_rows_l1(A, kappa)
    h, outputs = h0, []
    for t in range(x.shape[1]):
        U = torch.cat((x[:, t], h), dim=1)
        X = torch.zeros(U.shape[0], A.shape[0], dtype=x.dtype)
        for _ in range(iterations):
            X = torch.relu(X @ A.t() + U @ B.t() + b_hidden)
        h = X @ C.t() + d_scale * (U @ D.t()) + b_out
        outputs.append(h)
    return torch.stack(outputs, dim=1), h


def params(cell):
    """The cell's parameters in reference_rnn's order (the default cell has
    biases, as nn.RNN's)."""
    layer = cell.layer
    assert layer.bias
    return layer.A, layer.B, layer.C, layer.D, layer.bias_hidden, layer.bias_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_shapes_dtype_and_last_output(dtype):
    torch.manual_seed(0)
    cell = ImplicitRNNCell(3, 5, 7).to(dtype)
    x = torch.randn(4, 6, 3, dtype=dtype)
    outputs, h = cell(x)
    assert outputs.shape == (4, 6, 5) and h.shape == (4, 5)
    assert outputs.dtype == h.dtype == dtype
    assert torch.equal(outputs[:, -1], h)
    assert cell.layer.input_dim == 8 and cell.layer.output_dim == 5 and cell.layer.hidden_dim == 7


def test_cell_matches_reference_with_and_without_h0():
    torch.manual_seed(1)
    cell = ImplicitRNNCell(2, 4, 6, **TIGHT).double()
    with torch.no_grad():  # make the projection active on some rows
        cell.layer.A.mul_(3)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    for h0 in (None, torch.randn(3, 4, dtype=torch.float64)):
        outputs, h = cell(x, h0)
        start = torch.zeros(3, 4, dtype=torch.float64) if h0 is None else h0
        ref_outputs, ref_h = reference_rnn(x, start, *params(cell), cell.layer.d_scale)
        torch.testing.assert_close(outputs, ref_outputs, atol=1e-10, rtol=0)
        torch.testing.assert_close(h, ref_h, atol=1e-10, rtol=0)


def test_each_step_is_the_inner_models_output_and_warm_started(monkeypatch):
    torch.manual_seed(2)
    cell = ImplicitRNNCell(2, 3, 5, **TIGHT).double()
    x = torch.randn(4, 4, 2, dtype=torch.float64)
    starts, states = [], []
    solve = cell.layer.forward_with_state

    def recording(U, X0=None):
        starts.append(X0)
        h, state = solve(U, X0)
        states.append(state)
        return h, state

    python_loop(monkeypatch, cell)  # the fallback's steps; the op's: test_op_is_warm_started_...
    monkeypatch.setattr(cell.layer, "forward_with_state", recording)
    outputs, _ = cell(x)
    monkeypatch.undo()

    assert starts[0] is None
    for start, previous in zip(starts[1:], states[:-1]):
        assert not start.requires_grad and torch.equal(start, previous)
    h = torch.zeros(4, 3, dtype=torch.float64)
    for t in range(4):  # a cold solve of the same step gives the same h_t
        h = cell.layer(torch.cat((x[:, t], h), dim=1))
        torch.testing.assert_close(outputs[:, t], h, atol=1e-10, rtol=0)


def test_causal():
    torch.manual_seed(3)
    cell = ImplicitRNNCell(2, 3, 5, **TIGHT).double()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    changed = x.clone()
    changed[:, 4:] += torch.randn(2, 2, 2, dtype=torch.float64)
    before, _ = cell(x)
    after, _ = cell(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4], atol=0, rtol=0)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_stats_merge_steps_and_report_the_backward():
    torch.manual_seed(4)
    model = ImplicitRNN(2, 1, 4, 6, tol=1e-6)
    x = torch.randn(3, 5, 2)
    y = model(x)
    stats = model.last_stats
    assert len(model.recurrent.step_stats) == 5
    assert stats.forward["converged"] and stats.forward["residual"] <= 1e-6
    assert stats.forward["iterations"] == max(s.forward["iterations"] for s in model.recurrent.step_stats)
    assert stats.backward is None
    y.sum().backward()
    assert model.last_stats.backward["converged"]


def test_gradients_match_backprop_through_the_reference():
    torch.manual_seed(5)
    cell = ImplicitRNNCell(2, 3, 5, **TIGHT).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 3, dtype=torch.float64)
    inputs = (x, h0, *params(cell))
    (cell(x, h0)[0] * weights).sum().backward()
    grads = [t.grad.clone() for t in inputs]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    (reference_rnn(*ref_inputs, cell.layer.d_scale, iterations=200)[0] * weights).sum().backward()
    for grad, ref in zip(grads, ref_inputs):
        torch.testing.assert_close(grad, ref.grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("options", [dict(), dict(bias=True, activation="tanh")])
def test_gradcheck_float64(options):
    torch.manual_seed(6)
    model = ImplicitRNN(2, 2, 3, 4, **TIGHT, **options).double()
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def run(x, h0, *values):
        return functional_call(model, dict(zip(names, values)), (x, h0))

    assert torch.autograd.gradcheck(run, (x, h0, *values), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_tutorial_snippet_trains():
    torch.manual_seed(0)
    x = torch.randn(50, 20, 1)
    y = torch.randn(50, 1)
    model = ImplicitRNN(input_dim=1, output_dim=1, hidden_dim=10, implicit_hidden_dim=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 20, 1)).shape == (1, 1)


def test_argument_order_and_forwarded_kwargs():
    model = ImplicitRNN(3, 2, 4, 6, activation="tanh", is_low_rank=True, rank=2)
    assert model.recurrent.hidden_dim == 4 and model.recurrent.implicit_hidden_dim == 6
    assert model.linear.in_features == 4 and model.linear.out_features == 2
    assert model.recurrent.layer.activation == "tanh" and model.recurrent.layer.rank == 2
    assert model(torch.randn(2, 3, 3)).shape == (2, 2)


def test_nonconvergence_is_reported():
    torch.manual_seed(7)
    model = ImplicitRNN(1, 1, 4, 6, mitr=1, tol=0.0)
    with pytest.warns(idl.ImplicitFunctionWarning):
        model(torch.randn(2, 3, 1))
    assert not model.last_stats.forward["converged"]
    strict = ImplicitRNN(1, 1, 4, 6, mitr=1, tol=0.0, on_nonconvergence="raise", bias=False)
    strict(torch.randn(2, 3, 1) * 0)  # a run that converges (X = 0 at once)
    assert strict.last_stats.forward["converged"]
    with pytest.raises(idl.SolveNotConverged):
        strict(torch.randn(2, 3, 1))
    # the stats are the failed run's, not the previous run's
    stats = strict.last_stats.forward
    assert not stats["converged"] and stats["iterations"] == 1 and len(strict.recurrent.step_stats) == 1
    # the same through the Python loop (a φ defined in Python): the steps run
    from custom_activations import Softsign
    looped = ImplicitRNN(1, 1, 4, 6, mitr=1, tol=0.0, on_nonconvergence="raise", bias=False, f=Softsign)
    looped(torch.randn(2, 3, 1) * 0)
    assert len(looped.recurrent.step_stats) == 3 and looped.last_stats.forward["converged"]
    with pytest.raises(idl.SolveNotConverged):
        looped(torch.randn(2, 3, 1))
    assert len(looped.recurrent.step_stats) == 1 and not looped.last_stats.forward["converged"]


@pytest.mark.parametrize(
    "x, h0, error, match",
    [
        ([[1.0]], None, TypeError, "x must be a torch.Tensor"),
        (torch.randn(5, 2), None, ValueError, "add a batch dimension"),
        (torch.randn(2, 5, 3), None, ValueError, "input_dim=2"),
        (torch.randn(2, 0, 2), None, ValueError, "seq_len"),
        (torch.randn(2, 5, 2, dtype=torch.float64), None, TypeError, "dtype"),
        (torch.randn(2, 5, 2), torch.randn(2, 4), ValueError, "h0 must have shape"),
        (torch.randn(2, 5, 2), torch.randn(2, 3, dtype=torch.float64), TypeError, "h0 has dtype"),
        (torch.randn(2, 5, 2), "zeros", TypeError, "h0 must be a torch.Tensor"),
    ],
)
def test_bad_input(x, h0, error, match):
    model = ImplicitRNN(2, 1, 3, 4)
    with pytest.raises(error, match=match):
        model(x, h0)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((0, 1, 3, 4), ValueError, "input_dim"),
        ((2, 1, 3, 0), ValueError, "implicit_hidden_dim"),
        ((2, 1, 2.5, 4), TypeError, "hidden_dim"),
        ((2, 0, 3, 4), ValueError, "output_dim"),
    ],
)
def test_bad_construction(args, error, match):
    with pytest.raises(error, match=match):
        ImplicitRNN(*args)
    with pytest.raises(ValueError, match="activation"):
        ImplicitRNN(2, 1, 3, 4, activation="gelu")


# ---- idl::implicit_rnn: the whole recurrence as one op --------------------------------


def python_loop(monkeypatch, cell):
    """The cell with its op switched off: the Python loop over the steps."""
    monkeypatch.setattr(cell, "_op_applies", lambda x: False)
    return cell


def every_grad(model, inputs, weights):
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad((out * weights).sum(), [*inputs, *model.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("options", [
    dict(),
    dict(bias=True, activation="tanh"),
    dict(activation="leaky_relu", projection="scale", solver="anderson"),
    dict(is_low_rank=True, rank=2, bias=True),
    dict(no_D=True, bias=True, activation="sigmoid"),
    dict(rtol=1e-4, grad_rtol=1e-4, solver="auto"),
    dict(backward="phantom", phantom_steps=3),
])
def test_op_matches_the_python_loop_with_every_gradient(monkeypatch, options):
    torch.manual_seed(8)
    cell = ImplicitRNNCell(2, 3, 5, **TIGHT, **options).double()
    if hasattr(cell.layer, "A"):
        with torch.no_grad():  # make the projection active on some rows
            cell.layer.A.mul_(30)
    x = torch.randn(4, 6, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 6, 3, dtype=torch.float64)
    assert cell._op_applies(x)
    out, grads = every_grad(cell, (x, h0), weights)
    op_stats = [s.forward for s in cell.step_stats]
    ref_out, ref_grads = every_grad(python_loop(monkeypatch, cell), (x, h0), weights)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-9, rtol=1e-9)
    # the same solves, warm-started alike: the same iterations at every step
    assert [s["iterations"] for s in op_stats] == [s.forward["iterations"] for s in cell.step_stats]


def test_op_runs_stacked_and_bidirectional_layers_as_the_loop(monkeypatch):
    torch.manual_seed(9)
    model = ImplicitRNN(2, 2, 3, 4, num_layers=2, bidirectional=True, bias=True, **TIGHT).double()
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 2, dtype=torch.float64)
    out, grads = every_grad(model, (x, h0), weights)
    for cell in model.cells:
        python_loop(monkeypatch, cell)
    ref_out, ref_grads = every_grad(model, (x, h0), weights)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-9, rtol=1e-9)


def test_op_is_warm_started_and_each_step_is_the_layers_solve():
    torch.manual_seed(10)
    cell = ImplicitRNNCell(2, 3, 8, tol=1e-10, mitr=2000, kappa=0.9).double()
    with torch.no_grad():
        cell.layer.A.mul_(80)  # slow contraction: a warm start saves iterations
    x = torch.randn(4, 6, 2, dtype=torch.float64) * 0.1
    outputs, _ = cell(x)
    warm = [s.forward["iterations"] for s in cell.step_stats]
    h, cold = torch.zeros(4, 3, dtype=torch.float64), []
    for t in range(6):  # a cold solve of the same step gives the same h_t
        h = cell.layer(torch.cat((x[:, t], h), dim=1))
        cold.append(cell.layer.last_stats.forward["iterations"])
        torch.testing.assert_close(outputs[:, t], h, atol=1e-9, rtol=0)
    assert warm[0] == cold[0] and sum(warm[1:]) < sum(cold[1:])


def op_args(dtype=torch.float64, requires_grad=True, **settings):
    torch.manual_seed(11)
    make = lambda *shape: torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    x, h0, A, B, C, D, bh, bo = make(2, 3, 2), make(2, 3), make(4, 4), make(4, 5), make(3, 4), make(3, 5), \
        make(4), make(3)
    options = dict(well_posed="exact", kappa=0.9, activation="tanh", slope=0.01, max_iter=500, tol=1e-12,
                   grad_max_iter=500, grad_tol=1e-12, method="picard", memory=5)
    options.update(settings)
    return (x, h0, A, B, C, D, bh, bo, None, *options.values())


def test_op_gradcheck():
    args = op_args()
    tensors = args[:8]

    def outputs(*tensors):
        return idl._ops.ops.implicit_rnn(*tensors, torch.tensor([3, 2]), *args[9:], d_scale=0.5)[0]

    assert torch.autograd.gradcheck(outputs, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lengths", [None, [3, 2]])
def test_op_opcheck(lengths):
    from stats_opcheck import opcheck_with_stats

    args = list(op_args())
    args[8] = None if lengths is None else torch.tensor(lengths)
    opcheck_with_stats(idl._ops.ops.implicit_rnn.default, tuple(args), stats_index=(1, 2))


@pytest.mark.parametrize("packed", [False, True])
def test_op_with_lengths_matches_the_loop(monkeypatch, packed):
    torch.manual_seed(12)
    model = ImplicitRNN(2, 2, 3, 4, num_layers=2, bidirectional=True, bias=True, **TIGHT).double()
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 3])
    w_out, w_h = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(4, 3, 3, dtype=torch.float64)

    def run():
        if packed:
            seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            outputs, h_n = model.sequence(seq, h0)
            outputs = torch.nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True)[0]
        else:
            outputs, h_n = model.sequence(x, h0, lengths)
        loss = (outputs * w_out).sum() + (h_n * w_h).sum() + model(x, h0, lengths).sum()
        return outputs.detach(), h_n.detach(), torch.autograd.grad(loss, [x, h0, *model.parameters()])

    outputs, h_n, grads = run()
    assert torch.equal(outputs[1, 2:], torch.zeros(3, 6, dtype=torch.float64))
    for cell in model.cells:
        python_loop(monkeypatch, cell)
    ref_outputs, ref_h_n, ref_grads = run()
    torch.testing.assert_close(outputs, ref_outputs, atol=1e-10, rtol=0)
    torch.testing.assert_close(h_n, ref_h_n, atol=1e-10, rtol=0)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=1e-9, rtol=1e-9)


def test_op_stats_merge_the_steps_and_the_backward_writes_its_rows():
    cell = ImplicitRNNCell(2, 3, 4, tol=1e-8, grad_tol=1e-8).double()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    outputs, _ = cell(x)
    steps = cell.step_stats
    assert len(steps) == 5 and all(s.backward is None for s in steps)
    merged = cell.last_stats
    assert merged.forward["iterations"] == max(s.forward["iterations"] for s in steps)
    assert merged.forward["converged"] and merged.forward["criterion"] == "tol"
    outputs.sum().backward()
    assert merged.backward["converged"]
    assert merged.backward["iterations"] == max(s.backward["iterations"] for s in steps)


def test_op_create_graph_gives_first_derivatives_and_refuses_second_ones():
    cell = ImplicitRNNCell(2, 3, 4, activation="tanh", **TIGHT).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(cell(x)[0].square().sum(), x)
    (got,) = torch.autograd.grad(cell(x)[0].square().sum(), x, create_graph=True)
    torch.testing.assert_close(got.detach(), want, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="fixed_point_adjoint is not differentiable"):
        got.square().sum().backward()
