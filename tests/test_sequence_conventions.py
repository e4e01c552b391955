"""ImplicitRNN and the implicit attention as PyTorch sequence modules: layouts
(batch_first), lengths and PackedSequence, layers and directions, final
states, masks, cross-attention, autocast, and the safe handling of a
diverged adjoint. Small sizes: every test runs in about a second."""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import idl
from idl import ImplicitAttentionHead, ImplicitMultiHeadAttention, ImplicitRNN, ImplicitRNNCell

TIGHT = dict(tol=1e-10, grad_tol=1e-10, mitr=500, grad_mitr=500)


def rnn(**kwargs):
    torch.manual_seed(0)
    return ImplicitRNN(**{**dict(input_dim=2, output_dim=3, hidden_dim=4, implicit_hidden_dim=5), **TIGHT,
                          **kwargs}).double()


# ---- RNN -------------------------------------------------------------------------


def test_tutorial_call_is_unchanged():
    model = ImplicitRNN(input_dim=1, output_dim=1, hidden_dim=10, implicit_hidden_dim=10)
    assert model(torch.randn(50, 20, 1)).shape == (50, 1)
    assert model.batch_first


def test_batch_first_false_reads_sequence_first():
    model = rnn()
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    seq_first = rnn(batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1)), model(x))
    outputs, h_n = seq_first.sequence(x.transpose(0, 1))
    assert outputs.shape == (6, 3, 4) and h_n.shape == (1, 3, 4)


@pytest.mark.parametrize("batch_first, shape", [(True, (20, 8, 3)), (False, (8, 20, 3)), (True, (20, 8))])
def test_input_that_does_not_fit_is_refused(batch_first, shape):
    model = rnn(batch_first=batch_first)
    with pytest.raises(ValueError, match=r"ImplicitRNN: x must have shape .*batch_first"):
        model(torch.randn(*shape, dtype=torch.float64))


def test_lengths_and_packed_sequences_read_each_last_valid_step():
    model = rnn()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    y, h_n = model(x, lengths=lengths, return_state=True)
    for b, n in enumerate(lengths.tolist()):
        y_b, h_b = model(x[b : b + 1, :n], return_state=True)
        torch.testing.assert_close(y[b : b + 1], y_b)
        torch.testing.assert_close(h_n[:, b : b + 1], h_b)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    torch.testing.assert_close(model(packed), y)
    outputs, _ = model.sequence(x, lengths=lengths)
    assert (outputs[1, 2:] == 0).all()


def test_bidirectional_layers_shapes_and_reverse_direction():
    model = rnn(num_layers=2, bidirectional=True, dropout=0.5)
    assert len(model.cells) == 4 and model.cells[2].input_dim == 8 and model.linear.in_features == 8
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    model.eval()
    y, h_n = model(x, return_state=True)
    assert y.shape == (3, 3) and h_n.shape == (4, 3, 4)
    outputs, _ = model.sequence(x)
    assert outputs.shape == (3, 5, 8)
    # the backward direction of layer 0 is the cell run on the flipped sequence
    cell = model.cells[1]
    reverse, h = cell(x.flip(1))
    torch.testing.assert_close(h_n[1], h)
    # h0 in nn.LSTM's layout, fed back
    y2 = model(x, h0=h_n)
    assert y2.shape == (3, 3)
    model.train()
    y_train = model(x)  # dropout between the layers
    y_train.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_return_state_and_h0_layouts():
    model = rnn()
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    y, h_n = model(x, return_state=True)
    assert h_n.shape == (1, 2, 4)
    _, h = model.recurrent(x)
    torch.testing.assert_close(h_n[0], h)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x, h0), model(x, h0.unsqueeze(0)))
    with pytest.raises(ValueError, match=r"ImplicitRNN: h0 must have shape"):
        rnn(num_layers=2)(x, h0)


def test_cell_order_matches_the_rnn_and_errors_name_the_class():
    cell = ImplicitRNNCell(input_dim=3, hidden_dim=4, implicit_hidden_dim=6)
    assert (cell.input_dim, cell.hidden_dim, cell.implicit_hidden_dim) == (3, 4, 6)
    assert ImplicitRNNCell(3, 4, 6).hidden_dim == 4
    with pytest.raises(TypeError, match=r"ImplicitRNN.__init__\(\) got an unexpected keyword argument 'hiden_dim'"):
        ImplicitRNN(1, 1, 3, 4, hiden_dim=3)
    with pytest.raises(TypeError, match=r"ImplicitRNNCell.__init__\(\) got an unexpected keyword"):
        ImplicitRNNCell(1, 3, 4, num_heads=2)


def test_rnn_cells_have_biases_by_default_and_bias_false_is_torchidls_layout():
    biased = ImplicitRNN(1, 1, 3, 4, num_layers=2)
    assert all(cell.layer.bias for cell in biased.cells)
    assert {"recurrent.layer.bias_hidden", "recurrent.layer.bias_out"} <= set(biased.state_dict())
    plain = ImplicitRNN(input_dim=1, output_dim=1, hidden_dim=3, implicit_hidden_dim=4, bias=False)
    keys = set(plain.state_dict())
    assert keys == {"recurrent.layer." + k for k in ("A", "B", "C", "D", "d_scale")} | {"linear.weight", "linear.bias"}
    assert not ImplicitRNNCell(1, 3, 4, bias=False).layer.bias
    with pytest.raises(RuntimeError, match="bias_hidden"):  # a bias-free checkpoint needs bias=False
        ImplicitRNN(1, 1, 3, 4).load_state_dict(plain.state_dict())


def test_factory_arguments_and_solver_options():
    model = ImplicitRNN(1, 1, 3, 4, dtype=torch.float64, solver="anderson", anderson_memory=3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.recurrent.layer.options.memory == 3
    assert model(torch.randn(2, 3, 1, dtype=torch.float64)).dtype == torch.float64


# ---- attention --------------------------------------------------------------------


def mha(**kwargs):
    torch.manual_seed(1)
    return ImplicitMultiHeadAttention(**{**dict(n_embd=8, num_heads=2, block_size=6), **TIGHT, **kwargs}).double()


def test_non_causal_and_key_padding_mask():
    attention = mha(causal=False)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = attention(x)
    changed = x.clone()
    changed[:, 4] += 1
    assert (attention(changed)[:, 0] - y[:, 0]).abs().max() > 1e-6  # token 0 sees token 4
    # padded keys are ignored: the first 3 tokens as if the sequence ended there
    padding = torch.tensor([[False] * 3 + [True] * 2] * 2)
    torch.testing.assert_close(attention(x, key_padding_mask=padding)[:, :3], attention(x[:, :3]))
    # a causal call of a non-causal module, and a boolean attn_mask equal to it
    causal = attention(x, is_causal=True)
    torch.testing.assert_close(causal, mha()(x))
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(attention(x, attn_mask=blocked), causal)
    float_mask = torch.zeros(5, 5, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    torch.testing.assert_close(attention(x, attn_mask=float_mask), causal)


def test_cross_attention():
    attention = mha(causal=False, feedback="full")
    query = torch.randn(2, 3, 8, dtype=torch.float64)
    memory = torch.randn(2, 5, 8, dtype=torch.float64)
    y = attention(query, memory, memory)
    assert y.shape == (2, 3, 8) and attention.last_stats.forward["converged"]
    # each query token depends on the memory and on itself only
    changed = query.clone()
    changed[:, 2] += 1
    torch.testing.assert_close(attention(changed, memory, memory)[:, :2], y[:, :2])
    y.sum().backward()
    assert attention.B.grad.abs().sum() > 0


def test_attention_batch_first_false():
    attention = mha()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    seq_first = mha(batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1)), attention(x).transpose(0, 1))
    with pytest.raises(ValueError, match=r"ImplicitMultiHeadAttention: x must have shape \(T, batch"):
        seq_first(torch.randn(2, 5, 7, dtype=torch.float64))


def test_attention_options_and_errors_name_the_class():
    attention = ImplicitMultiHeadAttention(8, 2, solver="anderson", anderson_memory=3, dtype=torch.float64)
    assert attention.options.memory == 3 and attention.A.dtype == torch.float64
    assert ImplicitAttentionHead(8, 4, anderson_memory=7).options.memory == 7
    with pytest.raises(TypeError, match=r"ImplicitMultiHeadAttention.__init__\(\) got an unexpected keyword"):
        ImplicitMultiHeadAttention(8, 2, heads=3)


@pytest.mark.parametrize("feedback, op, shapes", [
    ("full", "attention_solve", [(4, 6, 8), (2, 4, 5, 6)]),  # A, C0
    ("values", "attention_value_solve", [(4, 2, 2), (4, 2, 2), (2, 4, 5, 2), (2, 4, 5, 5)]),  # Avv, Avo, C', Wt
])
def test_heads_are_one_batched_solve(monkeypatch, feedback, op, shapes):
    attention = mha(num_heads=4, n_embd=8, feedback=feedback)
    calls = []
    solve = getattr(idl.attention, op)

    def counting(*args):
        calls.append([tuple(t.shape) for t in args if isinstance(t, torch.Tensor)])
        return solve(*args)

    monkeypatch.setattr(idl.attention, op, counting)
    attention(torch.randn(2, 5, 8, dtype=torch.float64))
    assert calls == [shapes]


# ---- stability ---------------------------------------------------------------------


def test_a_diverged_adjoint_hands_no_gradient_to_the_optimizer():
    head = ImplicitAttentionHead(4, 2, 6, feedback="full").double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.warns(idl.ImplicitFunctionWarning, match="gradient is set to zero"):
        (head(x) * float("nan")).sum().backward()
    assert (head.A.grad == 0).all() and (head.B.grad == 0).all()
    strict = ImplicitAttentionHead(4, 2, 6, feedback="full", on_nonconvergence="raise").double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        with pytest.raises(idl.SolveNotConverged, match="backward"):
            (strict(x) * float("nan")).sum().backward()


@pytest.mark.parametrize("attention", idl.ATTENTIONS)
def test_full_feedback_is_a_contraction_on_random_large_states(attention):
    """||F(X) - F(Y)|| <= kappa ||X - Y|| in the weighted norm
    max(||kqv||_inf, ||out||_inf / L), for A at the edge of the ball."""
    torch.manual_seed(2)
    head = ImplicitAttentionHead(4, 2, 8, attention, "full", kappa=0.95).double()
    with torch.no_grad():
        head.A.mul_(100)
    A = head.effective_A()
    phi = head.activation(8)
    L = head.lipschitz

    def norm(D):
        return torch.maximum(D[..., :6].abs().amax(), D[..., 6:].abs().amax() / L)

    for _ in range(20):
        C0 = 5 * torch.randn(1, 8, 6, dtype=torch.float64)
        X, Y = 5 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
        FX, FY = phi(X @ A.t() + C0), phi(Y @ A.t() + C0)
        assert norm(FX - FY) <= 0.95 * norm(X - Y) + 1e-12


# ---- autocast ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["rnn", "head", "multihead"])
def test_autocast_forward_and_backward_solve_in_float32(which, dtype):
    torch.manual_seed(3)
    if which == "rnn":
        module, x = ImplicitRNN(2, 1, 4, 5, tol=1e-5, grad_tol=1e-5), torch.randn(3, 6, 2)
    elif which == "head":
        module, x = ImplicitAttentionHead(8, 4, 6, feedback="full", tol=1e-5, grad_tol=1e-5), torch.randn(2, 6, 8)
    else:
        module, x = ImplicitMultiHeadAttention(8, 2, 6, tol=1e-5, grad_tol=1e-5), torch.randn(2, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idl.ImplicitFunctionWarning)
        with torch.autocast("cpu", dtype=dtype):
            y = module(x)
            loss = y.float().square().mean()
        loss.backward()
    assert torch.isfinite(loss)
    stats = module.last_stats
    assert stats.forward["converged"] and stats.backward["converged"]
    for p in module.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_multi_head_loads_a_checkpoint_of_separate_heads():
    attention = mha(bias=True)
    old = {f"heads.{i}.{name}": getattr(attention, name)[i].detach().clone()
           for i in range(2) for name in ("A", "B", "bias_hidden")}
    old.update({f"proj.{k}": v for k, v in attention.proj.state_dict().items()})
    fresh = ImplicitMultiHeadAttention(8, 2, 6, bias=True, dtype=torch.float64)
    fresh.load_state_dict(old)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), attention(x))
