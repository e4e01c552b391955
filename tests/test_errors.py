"""Bad input to ImplicitModel is answered by a clear ValueError/TypeError that
names the argument."""
import pytest
import torch

import idl

ARGS = dict(input_dim=3, output_dim=2, hidden_dim=4)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(kappa=0.0), ValueError, "kappa"),
        (dict(kappa=1.2), ValueError, "kappa"),
        (dict(kappa=-0.5), ValueError, "kappa"),
        (dict(kappa="0.9"), TypeError, "kappa"),
        (dict(is_low_rank=True), ValueError, "rank"),
        (dict(is_low_rank=True, rank=5), ValueError, "rank"),
        (dict(is_low_rank=True, rank=0), ValueError, "rank"),
        (dict(hidden_dim=0), ValueError, "hidden_dim"),
        (dict(input_dim=2.5), TypeError, "input_dim"),
        (dict(mitr=0), ValueError, "mitr"),
        (dict(tol=-1e-3), ValueError, "tol"),
        (dict(grad_tol=float("nan")), ValueError, "grad_tol"),
        (dict(activation="gelu"), ValueError, "activation"),
        (dict(projection="clip"), ValueError, "projection"),
        (dict(on_nonconvergence="ignore"), ValueError, "on_nonconvergence"),
        (dict(f=torch.nn.ReLU), TypeError, "f must be"),
        (dict(solver="newton"), ValueError, "solver"),
        (dict(solver="anderson", anderson_memory=0), ValueError, "memory"),
        (dict(solver="anderson", anderson_memory=99), ValueError, "memory"),
    ],
)
def test_bad_settings(kwargs, error, words):
    with pytest.raises(error, match=words):
        idl.ImplicitModel(**{**ARGS, **kwargs})


class OnlyPhi(idl.ImplicitFunctionInf):
    @staticmethod
    def phi(X):
        return torch.tanh(X)


class WithPhi(OnlyPhi):
    @staticmethod
    def dphi(X):
        return 1 - torch.tanh(X) ** 2


def test_custom_activation_needs_both_phi_and_dphi():
    with pytest.raises(TypeError, match="phi and dphi"):
        idl.ImplicitModel(**ARGS, f=OnlyPhi)


def test_custom_activation_conflicts_with_a_named_one():
    with pytest.raises(ValueError, match="conflicts"):
        idl.ImplicitModel(**ARGS, f=WithPhi, activation="tanh")


@pytest.mark.parametrize(
    "U, error, words",
    [
        (torch.randn(2, 5), ValueError, "input_dim=3"),
        (torch.randn(3), ValueError, "shape"),
        (torch.randn(2, 3, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(2, 3).int(), TypeError, "dtype"),
        ([[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
        (torch.randn(2, 3, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_input(U, error, words):
    model = idl.ImplicitModel(**ARGS)
    with pytest.raises(error, match=words):
        model(U)


def test_bad_warm_start():
    model = idl.ImplicitModel(**ARGS)
    with pytest.raises(ValueError, match="X0 must have shape"):
        model(torch.randn(2, 3), X0=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="X0"):
        model(torch.randn(2, 3), X0=torch.zeros(2, 4, dtype=torch.float64))
