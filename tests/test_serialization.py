"""ImplicitModel survives the ways training stacks copy and store modules:
state_dict save/load (bit-exact), copy.deepcopy, pickling of whole modules;
and its results are deterministic for a fixed seed."""
import copy
import io
import pickle

import pytest
import torch

import idl
from custom_activations import Softsign

VARIANTS = {
    "default": dict(),
    "bias_tanh": dict(bias=True, activation="tanh"),
    "low_rank_scale": dict(is_low_rank=True, rank=3, projection="scale"),
    "no_D_triu": dict(no_D=True, f=idl.ImplicitFunctionTriu, activation="leaky_relu"),
}
ARGS = dict(input_dim=5, output_dim=3, hidden_dim=6, tol=1e-10, grad_tol=1e-10)


def make(seed, **kwargs):
    torch.manual_seed(seed)
    return idl.ImplicitModel(**{**ARGS, **kwargs}).double()


def batch(seed=100, m=4):
    return torch.randn(m, ARGS["input_dim"], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def output_and_grads(model, U):
    model.zero_grad()
    out = model(U)
    out.square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def assert_identical(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_state_dict_round_trip_is_exact(variant):
    source, target = make(0, **variant), make(1, **variant)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    U = batch()
    assert_identical(output_and_grads(target, U), output_and_grads(source, U))


def test_state_dict_holds_parameters_not_the_no_D_zeros():
    assert set(make(0).state_dict()) == {"A", "B", "C", "D", "d_scale"}
    assert set(make(0, no_D=True, bias=True).state_dict()) == {"A", "B", "C", "bias_hidden", "bias_out"}
    assert set(make(0, is_low_rank=True, rank=2).state_dict()) == {"L", "R", "B", "C", "D", "d_scale"}


def test_a_state_dict_without_d_scale_holds_the_D_it_applies():
    """torchidl's state dicts (A, B, C, D) apply D as it is: they load with
    d_scale = 1, whatever the model was built with."""
    source = make(0, d_scale=1.0)
    with torch.no_grad():
        source.D.normal_()
    plain = {k: v for k, v in source.state_dict().items() if k != "d_scale"}
    target = make(1)
    assert target.d_scale == pytest.approx(ARGS["input_dim"] ** -0.5)
    target.load_state_dict(plain)
    assert target.d_scale == 1.0
    U = batch()
    torch.testing.assert_close(target(U), source(U), atol=0, rtol=0)
    torch.testing.assert_close(target.readout(U, torch.zeros(4, 6, dtype=torch.float64)), U @ source.D.t())


def test_loading_a_mismatched_state_dict_fails_and_names_the_key():
    low_rank = make(0, is_low_rank=True, rank=2)
    with pytest.raises(RuntimeError, match="Missing key.*\"A\""):
        make(0).load_state_dict(low_rank.state_dict())
    smaller = idl.ImplicitModel(5, 3, 4).double()
    with pytest.raises(RuntimeError, match="size mismatch for A"):
        make(0).load_state_dict(smaller.state_dict())


@pytest.mark.parametrize("variant", [*VARIANTS.values(), dict(f=Softsign)],
                         ids=[*VARIANTS.keys(), "python_activation"])
def test_deepcopy_is_an_independent_equal_model(variant):
    model = make(0, **variant)
    U = batch()
    model(U)  # a copy made after a call carries last_stats along
    twin = copy.deepcopy(model)
    assert twin.last_stats == model.last_stats and twin.last_stats is not model.last_stats
    assert_identical(output_and_grads(twin, U), output_and_grads(model, U))
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert all(not torch.equal(p, q) for p, q in zip(twin.parameters(), model.parameters()))
    assert twin.options == model.options and twin.f is model.f


@pytest.mark.parametrize("variant", [*VARIANTS.values(), dict(f=Softsign)],
                         ids=[*VARIANTS.keys(), "python_activation"])
def test_pickle_and_torch_save_of_whole_module(variant):
    model = make(0, on_nonconvergence="raise", kappa=0.7, **variant)
    U = batch()
    want = output_and_grads(model, U)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for restored in copies:
        assert restored.options == model.options
        assert (restored.kappa, restored.f, restored.activation) == (model.kappa, model.f, model.activation)
        assert_identical(output_and_grads(restored, U), want)


def test_pickled_model_keeps_its_nonconvergence_policy():
    model = make(0, mitr=2, tol=0.0, on_nonconvergence="raise")
    restored = pickle.loads(pickle.dumps(model))
    with pytest.raises(idl.SolveNotConverged, match="iterations=2"):
        restored(batch())


def train(seed, steps=5):
    """A few SGD steps from a seeded init on seeded data; the trajectory."""
    model = make(seed, bias=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        U = torch.randn(8, ARGS["input_dim"], generator=g, dtype=torch.float64)
        target = torch.randn(8, ARGS["output_dim"], generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss = (model(U) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


def test_training_is_deterministic_for_a_fixed_seed():
    losses, state = train(seed=3)
    losses_again, state_again = train(seed=3)
    torch.testing.assert_close(losses_again, losses, atol=0, rtol=0)
    for key in state:
        torch.testing.assert_close(state_again[key], state[key], atol=0, rtol=0)
    other_losses, _ = train(seed=4)
    assert not torch.equal(other_losses, losses)


def test_runs_under_torch_deterministic_algorithms():
    model = make(0)
    U = batch()
    want = output_and_grads(model, U)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_identical(output_and_grads(model, U), want)
    finally:
        torch.use_deterministic_algorithms(previous)
