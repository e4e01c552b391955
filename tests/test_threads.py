"""Thread safety: models with different settings, used concurrently from
several threads (forward and backward), give the same results, the same solve
stats and the same non-convergence behaviour as used one after another."""
import threading
import warnings

import torch

import idl
from custom_activations import Softsign

ROUNDS = 8


SETTINGS = [
    dict(activation="tanh", kappa=0.9, tol=1e-10, grad_tol=1e-10),
    dict(activation="leaky_relu", negative_slope=0.2, projection="scale", bias=True),
    dict(is_low_rank=True, rank=3, mitr=3, tol=0.0),  # never converges: warns
    dict(f=Softsign, kappa=0.7),
    dict(f=idl.ImplicitFunctionTriu, activation="sigmoid", no_D=True),
    dict(mitr=2, tol=0.0, on_nonconvergence="raise"),  # raises, every time
]
DTYPES = [torch.float64, torch.float32, torch.float64, torch.float32, torch.float64, torch.float64]


def make_models():
    models = []
    for seed, (settings, dtype) in enumerate(zip(SETTINGS, DTYPES)):
        torch.manual_seed(seed)
        model = idl.ImplicitModel(5, 3, 6, **settings).to(dtype)
        with torch.no_grad():  # make the projections active
            for p in model.parameters():
                p.mul_(4)
        models.append(model)
    return models


def step(model, U):
    """One forward and backward; what a caller can observe of it."""
    model.zero_grad()
    try:
        out = model(U)
    except idl.SolveNotConverged as error:
        return ("raised", str(error), model.last_stats.forward)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return (out.detach(), grads, model.last_stats.forward, model.last_stats.backward)


def assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def inputs(models):
    g = torch.Generator().manual_seed(100)
    return [torch.randn(7, 5, generator=g, dtype=torch.float64).to(m.B.dtype) for m in models]


def test_concurrent_models_match_sequential_use():
    models = make_models()
    batches = inputs(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        expected = [step(m, U) for m, U in zip(models, batches)]
        results = [[] for _ in models]
        errors = []
        start = threading.Barrier(len(models))

        def run(i):
            try:
                start.wait()
                for _ in range(ROUNDS):
                    results[i].append(step(models[i], batches[i]))
            except BaseException as error:  # noqa: B902 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert expected[5][0] == "raised" and expected[2][2]["converged"] is False
    for want, got in zip(expected, results):
        assert len(got) == ROUNDS
        for result in got:
            assert_same(result, want)


def test_one_model_shared_by_threads_for_inference():
    """Inference only: last_stats then belongs to whichever call ended last,
    but every output is that of a call on its own."""
    model = make_models()[0]
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(4 + i, 5, generator=g, dtype=torch.float64) for i in range(4)]
    with torch.no_grad():
        expected = [model(U) for U in batches]
        results = [[] for _ in batches]
        start = threading.Barrier(len(batches))

        def run(i):
            start.wait()
            for _ in range(ROUNDS):
                with torch.no_grad():
                    results[i].append(model(batches[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    for want, got in zip(expected, results):
        assert len(got) == ROUNDS
        for out in got:
            torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_the_raise_policy_of_one_model_does_not_leak_into_another_thread():
    """Backward solves report to the model (and policy) that recorded them,
    whichever thread runs the backward."""
    strict = idl.ImplicitModel(5, 3, 6, grad_mitr=1, grad_tol=0.0, activation="tanh",
                               on_nonconvergence="raise").double()
    lenient = idl.ImplicitModel(5, 3, 6, grad_mitr=1, grad_tol=0.0, activation="tanh").double()
    U = torch.randn(4, 5, dtype=torch.float64)
    outcomes = {}

    def backward(name, out):
        try:
            out.sum().backward()
            outcomes[name] = "finished"
        except idl.SolveNotConverged:
            outcomes[name] = "raised"

    # forward on this thread, backward on others, side by side (warnings are
    # process-wide state, so they are silenced here rather than recorded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idl.ImplicitFunctionWarning)
        outs = {"strict": strict(U), "lenient": lenient(U)}
        threads = [threading.Thread(target=backward, args=item) for item in outs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert outcomes == {"strict": "raised", "lenient": "finished"}
    assert strict.last_stats.backward["converged"] is False
    assert lenient.last_stats.backward["converged"] is False
