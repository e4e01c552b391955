"""State-driven Implicit Modeling (SIM): fit an implicit model to the hidden
states of a trained explicit network with a convex solver.

    from idl.sim import SIM
    from idl.sim.solvers import BatchedProxSolver, CVXSolver

    sim = SIM(activation_fn=torch.nn.functional.relu, kappa=0.99)
    sim.train(solver=BatchedProxSolver(), model=net, dataloader=loader)
    accuracy = sim.evaluate(test_loader)
    model = sim.implicit_model            # an idl.ImplicitModel

By default the teacher is prepared on a copy (BatchNorm folded, hidden layers
rescaled so that an exact well-posed embedding exists), biases are fitted, and
[C D] is fitted on regenerated states: see :class:`SIM`. Progress and results
are logged on the ``idl.sim`` logger.
"""
from .rescale import balance_hidden_norms
from .sim import SIM
from .states import ACTIVATION_TYPES, States, capture_states, load_states, save_states
from .teacher import PreparedTeacher, prepare_teacher

__all__ = [
    "ACTIVATION_TYPES",
    "PreparedTeacher",
    "SIM",
    "States",
    "balance_hidden_norms",
    "capture_states",
    "load_states",
    "prepare_teacher",
    "save_states",
]
