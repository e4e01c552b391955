"""State-driven Implicit Modeling (SIM): fit an implicit model to the hidden
states of a trained explicit network with a convex solver.

    from idl.sim import SIM
    from idl.sim.solvers import BatchedProxSolver, CVXSolver

    sim = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99)
    sim.train(solver=BatchedProxSolver(), model=net, dataloader=loader)
    accuracy = sim.evaluate(test_loader)
    model = sim.implicit_model            # an idl.ImplicitModel

Progress and results are logged on the ``idl.sim`` logger.
"""
from . import _prox_ops  # noqa: F401  (fake kernel of idl::prox_l1_ball)
from .rescale import balance_hidden_norms
from .sim import SIM
from .states import ACTIVATION_TYPES, States, capture_states, load_states, save_states

__all__ = [
    "ACTIVATION_TYPES",
    "SIM",
    "States",
    "balance_hidden_norms",
    "capture_states",
    "load_states",
    "save_states",
]
