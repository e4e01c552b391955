"""ImplicitAttentionHead and ImplicitMultiHeadAttention against a loop-based
plain-torch reference."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import idl
from idl import ImplicitAttentionHead, ImplicitMultiHeadAttention

TIGHT = dict(tol=1e-12, grad_tol=1e-12, mitr=500, grad_mitr=500)
# (attention, solver, feedback): every value of each, softmax-picard in both
# feedback modes.
VARIANTS = [
    ("softmax", "picard", "values"),
    ("softmax", "picard", "full"),
    ("softmax", "anderson", "full"),
    ("lipschitz", "picard", "full"),
    ("lipschitz", "anderson", "values"),
]


def reference_attention(q, k, v, kind):
    """One sequence's causal attention, token by token."""
    rows = []
    for i in range(q.shape[0]):
        if kind == "softmax":
            scores = torch.stack([q[i] @ k[j] for j in range(i + 1)]) / math.sqrt(q.shape[1])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            rows.append(sum(weights[j] * v[j] for j in range(i + 1)))
        else:
            weights = torch.stack([torch.exp(-(q[i] - k[j]).square().sum()) for j in range(i + 1)])
            squashed = v / torch.sqrt(1 + v * v)
            rows.append(sum(weights[j] * squashed[j] for j in range(i + 1)) / (0.25 + weights.sum()))
    return torch.stack(rows)


def squash(t):
    return t / torch.sqrt(1 + t * t)


def reference_state(x, A, B, kind, bias=None, iterations=150, bounded=False):
    """Plain Picard on [k, q, v, out] = Φ(X Aᵀ + x Bᵀ + b), sequence by
    sequence, for a fixed number of iterations (differentiable by unrolling).
    ``bounded`` (feedback="full"): attention reads squashed q, k (and v for
    softmax)."""
    hs = A.shape[1] // 4
    states = []
    for sequence in x:
        X = torch.zeros(sequence.shape[0], 4 * hs, dtype=x.dtype)
        for _ in range(iterations):
            Z = X @ A.t() + sequence @ B.t()
            if bias is not None:
                Z = Z + bias
            k, q, v = Z[:, :hs], Z[:, hs : 2 * hs], Z[:, 2 * hs :]
            if bounded:
                qa, ka, va = squash(q), squash(k), (squash(v) if kind == "softmax" else v)
            else:
                qa, ka, va = q, k, v
            X = torch.cat((k, q, v, reference_attention(qa, ka, va, kind)), dim=1)
        states.append(X)
    return torch.stack(states)


def make_head(attention, solver="picard", feedback="values", scale=3.0, seed=0, **options):
    """A float64 head whose A is scaled up so the projection is active and the
    state feeds back strongly."""
    torch.manual_seed(seed)
    head = ImplicitAttentionHead(4, 2, 6, attention, feedback, solver=solver, **{**TIGHT, **options}).double()
    with torch.no_grad():
        if head.is_low_rank:
            head.L.mul_(scale)
            head.R.mul_(scale)
        else:
            head.A.mul_(scale)
    return head


@pytest.mark.parametrize("attention, solver, feedback", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtype(attention, solver, feedback, dtype):
    torch.manual_seed(0)
    head = ImplicitAttentionHead(8, 3, 10, attention, feedback, solver=solver).to(dtype)
    x = torch.randn(2, 7, 8, dtype=dtype)
    y, state = head(x), head.state(x)
    assert y.shape == (2, 7, 3) and state.shape == (2, 7, 12)
    assert y.dtype == state.dtype == dtype
    torch.testing.assert_close(y, state[..., 9:])


@pytest.mark.parametrize("attention", idl.ATTENTIONS)
def test_zero_A_is_the_explicit_head(attention):
    torch.manual_seed(1)
    head = ImplicitAttentionHead(5, 3, 8, attention).double()
    with torch.no_grad():
        head.A.zero_()
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    k, q, v = (x @ head.B.t()).chunk(3, dim=-1)
    expected = torch.stack([reference_attention(q[b], k[b], v[b], attention) for b in range(2)])
    torch.testing.assert_close(head(x), expected, atol=1e-14, rtol=0)
    assert head.last_stats.forward["iterations"] == 2  # Φ(C0), then no change


@pytest.mark.parametrize("attention, solver, feedback", VARIANTS)
def test_matches_reference(attention, solver, feedback):
    head = make_head(attention, solver, feedback, bias=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = reference_state(x, head.effective_A().detach(), head.B.detach(), attention, head.bias_hidden.detach(),
                               bounded=feedback == "full")
    torch.testing.assert_close(head.state(x), expected, atol=1e-10, rtol=0)
    assert head.last_stats.forward["converged"]


@pytest.mark.parametrize("attention, solver, feedback", VARIANTS)
def test_returned_state_is_a_fixed_point(attention, solver, feedback):
    tol = 1e-7
    head = make_head(attention, solver, feedback, tol=tol)
    x = 2 * torch.randn(3, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        X = head.state(x)
        mapped = head.activation(6)(X @ head.effective_A().t() + x @ head.B.t())
    residual = (mapped - X).abs().amax(dim=(1, 2))
    assert (residual <= tol).all(), residual
    assert head.last_stats.forward["residual"] <= tol


@pytest.mark.parametrize("attention, solver, feedback", VARIANTS)
def test_causal(attention, solver, feedback):
    head = make_head(attention, solver, feedback)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    changed = x.clone()
    changed[:, 3:] = torch.randn(2, 3, 4, dtype=torch.float64)
    before, after = head(x), head(changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], atol=1e-10, rtol=0)
    assert (before[:, 3:] - after[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("attention, feedback", [("softmax", "values"), ("lipschitz", "full")])
def test_gradients_match_backprop_through_the_reference(attention, feedback):
    head = make_head(attention, feedback=feedback, bias=True)
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    A = head.effective_A().detach().requires_grad_()
    weights = torch.randn(2, 4, 8, dtype=torch.float64)
    (head.state(x) * weights).sum().backward()
    assert head.last_stats.backward["converged"]
    leaves = (x, A, head.B, head.bias_hidden)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    full = feedback == "full"
    (reference_state(*ref_leaves[:3], attention, ref_leaves[3], iterations=80, bounded=full) * weights).sum().backward()
    # the module's A gradient reaches its raw parameter through the projection
    grad_A_effective = torch.autograd.grad(
        (reference_state(x.detach(), A, head.B.detach(), attention, head.bias_hidden.detach(), 80, full)
         * weights).sum(), A
    )[0]
    expected_raw = torch.autograd.grad(head.effective_A(), head.A, grad_A_effective)[0]
    torch.testing.assert_close(head.A.grad, expected_raw, atol=1e-9, rtol=1e-7)
    for leaf, ref in zip((x, head.B, head.bias_hidden), (ref_leaves[0], ref_leaves[2], ref_leaves[3])):
        torch.testing.assert_close(leaf.grad, ref.grad, atol=1e-9, rtol=1e-7)


# Full Jacobian checks for one variant per attention; the others compare
# random projections of it (fast_mode), which costs far fewer solves.
@pytest.mark.parametrize(
    "attention, solver, feedback, options, fast_mode",
    [
        ("softmax", "picard", "values", {}, False),
        ("lipschitz", "picard", "full", dict(bias=True), False),
        ("softmax", "picard", "full", {}, True),
        ("softmax", "anderson", "full", {}, True),
        ("lipschitz", "anderson", "values", {}, True),
        ("softmax", "picard", "values", dict(is_low_rank=True, rank=2, bias=True), True),
        ("lipschitz", "picard", "full", dict(is_low_rank=True, rank=3), True),
    ],
)
def test_gradcheck_float64(attention, solver, feedback, options, fast_mode):
    head = make_head(attention, solver, feedback, **options)
    names = [name for name, _ in head.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in head.parameters()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        return functional_call(head, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *values), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("feedback", ["values", "full"])
def test_anderson_agrees_with_picard(feedback):
    picard = make_head("softmax", "picard", feedback, tol=1e-10)
    anderson = make_head("softmax", "anderson", feedback, tol=1e-10)
    x = 2 * torch.randn(4, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(picard(x), anderson(x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("feedback", ["values", "full"])
@pytest.mark.parametrize("low_rank", [False, True])
def test_effective_A_is_projected_and_masked(low_rank, feedback):
    options = dict(is_low_rank=True, rank=3) if low_rank else {}
    head = make_head("softmax", feedback=feedback, scale=20.0, kappa=0.7, **options)
    A = head.effective_A()
    assert A.shape == (6, 8)
    L = idl.attention.lipschitz_bound("softmax", 2)
    weighted = A[:, :6].abs().sum(dim=1) + (L if feedback == "full" else 1.0) * A[:, 6:].abs().sum(dim=1)
    assert weighted.max() <= 0.7 + 1e-9
    k_q_reading_v_out = A[:4, 4:]  # rows k, q (2 + 2); columns v, out
    assert (k_q_reading_v_out == 0).all() == (feedback == "values")
    if not low_rank:
        raw = head.A.detach().clone()
        if feedback == "values":
            raw[:4, 4:] = 0
        expected = idl.project_linf(raw, 0.7)
        if feedback == "full":
            expected[:, 6:] /= L
        torch.testing.assert_close(A, expected)


def solve_with_large_weights_and_inputs(attention, feedback, seed):
    """Whether the forward solve converges with A at the edge of the ball
    and q, k, v of size ~50."""
    head = make_head(attention, feedback=feedback, scale=50.0, seed=seed, tol=1e-10, mitr=1000, kappa=0.9)
    with torch.no_grad():
        head.B.mul_(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        head(10 * torch.randn(3, 6, 4, dtype=torch.float64))
    return head.last_stats.forward["converged"]


@pytest.mark.parametrize("attention", idl.ATTENTIONS)
def test_value_feedback_always_converges(attention):
    assert all(solve_with_large_weights_and_inputs(attention, "values", seed) for seed in range(5))


@pytest.mark.parametrize("attention", idl.ATTENTIONS)
def test_full_feedback_always_converges(attention):
    """feedback="full" is well-posed by construction (squashed attention
    inputs, A's out columns divided by the Lipschitz bound): it converges on
    the weights and inputs that made the unbounded softmax version oscillate."""
    assert all(solve_with_large_weights_and_inputs(attention, "full", seed) for seed in range(5))


def test_nonconvergence_is_reported():
    head = make_head("softmax", mitr=1, tol=0.0)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    with pytest.warns(idl.ImplicitFunctionWarning, match="forward"):
        head(x)
    assert not head.last_stats.forward["converged"] and head.last_stats.forward["iterations"] == 1
    head = make_head("lipschitz", grad_mitr=1, grad_tol=0.0)
    with pytest.warns(idl.ImplicitFunctionWarning, match="backward"):
        head(x).sum().backward()
    assert not head.last_stats.backward["converged"]
    head = make_head("softmax", solver="anderson", mitr=2, tol=0.0, on_nonconvergence="raise")
    with pytest.raises(idl.SolveNotConverged):
        head(x)


class Block(nn.Module):
    """A GPT-style pre-norm transformer block around the implicit attention."""

    def __init__(self, n_embd, num_heads, block_size):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attention = ImplicitMultiHeadAttention(n_embd, num_heads, block_size, attention="lipschitz")
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def test_multi_head_in_a_transformer_block():
    torch.manual_seed(2)
    block = Block(n_embd=12, num_heads=3, block_size=8)
    x = torch.randn(2, 8, 12)
    y = block(x)
    assert y.shape == (2, 8, 12)
    y.square().mean().backward()
    attention = block.attention
    assert attention.head_size == 4 and attention.A.shape == (3, 12, 16)
    for h in range(3):  # every head gets a gradient
        assert attention.A.grad[h].abs().sum() > 0 and attention.B.grad[h].abs().sum() > 0
    stats = block.attention.last_stats
    assert stats.forward["converged"] and stats.backward["converged"]


def test_multi_head_matches_its_heads():
    torch.manual_seed(3)
    attention = ImplicitMultiHeadAttention(6, 2, 5, head_size=4, attention="softmax").double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    outputs = []
    for h in range(2):  # each head on its own, with that head's parameters
        head = ImplicitAttentionHead(6, 4, 5, "softmax").double()
        with torch.no_grad():
            head.A.copy_(attention.A[h])
            head.B.copy_(attention.B[h])
        outputs.append(head(x))
    torch.testing.assert_close(attention(x), attention.proj(torch.cat(outputs, dim=-1)))


@pytest.mark.parametrize(
    "x, error, match",
    [
        ("tokens", TypeError, "x must be a torch.Tensor"),
        (torch.randn(6, 4), ValueError, r"\(batch, T, n_embd=4\)"),
        (torch.randn(2, 6, 5), ValueError, "n_embd=4"),
        (torch.randn(2, 7, 4), ValueError, "block_size=6"),
        (torch.randn(2, 0, 4), ValueError, "T=0"),
        (torch.randn(2, 6, 4, dtype=torch.float64), TypeError, "dtype"),
    ],
)
def test_bad_input(x, error, match):
    head = ImplicitAttentionHead(4, 2, 6)
    with pytest.raises(error, match=match):
        head(x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(attention="linear"), ValueError, "attention must be one of"),
        (dict(solver="newton"), ValueError, "solver must be one of"),
        (dict(feedback="none"), ValueError, "feedback must be one of"),
        (dict(is_low_rank=True), ValueError, "rank is required"),
        (dict(is_low_rank=True, rank=7), ValueError, "rank must be <= 3 \\* head_size = 6"),
        (dict(kappa=1.5), ValueError, "kappa"),
        (dict(projection="clip"), ValueError, "projection"),
        (dict(mitr=0), ValueError, "mitr"),
        (dict(on_nonconvergence="ignore"), ValueError, "on_nonconvergence"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImplicitAttentionHead(4, 2, 6, **kwargs)


def test_bad_multi_head_construction():
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        ImplicitMultiHeadAttention(8, 3, 4)
    with pytest.raises(ValueError, match="num_heads"):
        ImplicitMultiHeadAttention(8, 0, 4)
    with pytest.raises(ValueError, match="block_size"):
        ImplicitMultiHeadAttention(8, 2, 0)


def test_attention_solves_read_their_residual_every_k_iterations_on_a_gpu(monkeypatch):
    """On CUDA a read of the residual drains the queue: the attention solves
    read it every IDL_CUDA_CHECK_EVERY iterations (as the compiled solves),
    every iteration on the CPU. Same fixed point either way."""
    from idl._attention_kernels import check_every, solve_sequences
    assert check_every(torch.device("cpu")) == 1
    monkeypatch.delenv("IDL_CUDA_CHECK_EVERY", raising=False)
    assert check_every(torch.device("cuda")) == 8
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", "3")
    assert check_every(torch.device("cuda")) == 3
    monkeypatch.setenv("IDL_CUDA_CHECK_EVERY", "-1")
    with pytest.raises(ValueError, match="IDL_CUDA_CHECK_EVERY"):
        check_every(torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    W = 0.5 * W / W.abs().sum(1, keepdim=True)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def step(x):
        return torch.tanh(x @ W.t() + b)

    start = torch.zeros(3, 6, dtype=torch.float64)
    x1, every_one = solve_sequences(step, start, 200, 1e-10, every=1)
    x4, every_four = solve_sequences(step, start, 200, 1e-10, every=4)
    _, never = solve_sequences(step, start, 50, 1e-10, every=0)
    assert every_one[2] == 1.0 and every_four[2] == 1.0
    assert every_four[0] % 4 == 0 and every_one[0] <= every_four[0] < every_one[0] + 4
    torch.testing.assert_close(x4, x1, atol=1e-9, rtol=0)
    assert never[0] == 50 and never[2] == 1.0
