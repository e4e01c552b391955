"""SIM: State-driven Implicit Modeling. Fit an implicit model to the hidden
states of a trained explicit network."""
import logging
import math
import os
import time
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import functional as F
from .._checks import check_positive_int
from ..implicit import ImplicitModel
from .fitted import implicit_model_from_weights
from .solvers.base import BaseSolver
from .solvers.batched import BatchedProxSolver
from .states import States, as_rows, capture_states, load_states, save_states
from .teacher import PreparedTeacher, prepare_teacher

#: Above this relative error of the fitted model's outputs (vs the teacher's,
#: on the training inputs) SIM.fit warns.
WARN_RELATIVE_ERROR = 0.05
#: The fit report evaluates the fitted model on at most this many samples.
REPORT_SAMPLES = 10_000

logger = logging.getLogger(__name__)


SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _as_dtype(dtype) -> torch.dtype:
    name = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dtype must be torch.float32 or torch.float64 (or its name): the solvers and the "
            f"fixed-point solve of the fitted model need single or double precision; got {name!r}"
        )
    return dtype


def _as_weight(value, name, shape, device, dtype) -> torch.Tensor:
    """A solver's output as a dense tensor of the expected shape."""
    if hasattr(value, "toarray"):  # scipy sparse
        value = value.toarray()
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the solver returned {name} as {type(value).__name__}; expected a tensor or array")
    if tuple(value.shape) != shape:
        raise ValueError(f"the solver returned {name} with shape {tuple(value.shape)}, expected {shape}")
    return value.detach().to(device=device, dtype=dtype)


class SIM(nn.Module):
    r"""State-driven Implicit Modeling: an implicit model
    X = φ(X Aᵀ + U Bᵀ), Ŷ = X Cᵀ + U Dᵀ fitted to the states of a trained
    explicit network (its pre- and post-activations, inputs and outputs) by a
    convex solver, row by row.

    SIM is an ``nn.Module``: after :meth:`train` (or :meth:`fit`), calling it on
    inputs runs the fitted :class:`idl.ImplicitModel`, available as
    ``sim.implicit_model`` (a drop-in module that can be fine-tuned).

    What :meth:`fit` does by default, and how to turn each part off:

    * **Teacher preparation** (``prepare_teacher=True``): when the teacher is a
      (nested) ``nn.Sequential`` of Linear, eval-mode BatchNorm1d, Flatten,
      Dropout and positively homogeneous activations equal to
      ``activation_fn`` (ReLU, LeakyReLU), SIM fits a *copy* with every
      BatchNorm folded into its Linear and the hidden layers rescaled to
      ||W||_inf = 0.9·kappa (the same function: biases scale by the
      cumulative factor, the last layer by its inverse), so that an exact
      well-posed embedding exists. The user's model is never changed.
    * **Biases** (``fit_bias=None``: when the teacher has a bias or a
      BatchNorm, or with ``standardize``): a constant-1 input column is appended to U for the solver,
      and its weights become the ``bias_hidden`` / ``bias_out`` of an
      ``ImplicitModel(bias=True)``. ``fit_bias=False`` drops them.
    * **Regenerated states**: with no ``solver`` given, the solver is
      ``BatchedProxSolver(regen_states=True)``: [C D] is fitted on the fixed
      point of the fitted A, B on the training inputs. Pass
      ``solver=BatchedProxSolver()`` to fit [C D] on the teacher's states.
    * **Report**: one log line (``idl.sim`` logger, INFO) says what was
      captured and prepared and the relative error of the fitted model's
      outputs vs the teacher's on the training inputs (also in
      ``sim.fit_info``); a UserWarning gives that error when it exceeds 5% or
      when the teacher has activations that ``activation_fn`` does not
      reproduce (GELU, SiLU, ... under relu), which no implicit model with
      this φ can match exactly.

    Args:
        activation_fn: φ of the implicit model; ``torch.nn.functional.relu``
            by default. relu, leaky_relu, tanh, hardtanh, sigmoid, softplus (as
            functions or modules) run in compiled code; any other elementwise
            callable runs in Python, with φ' by autograd.
        kappa: well-posedness bound, ||A||_inf <= kappa, in (0, 1]. Default 0.99.
        atol: tolerance of the fixed-point solve. Default 1e-6.
        skip_layers: None (default) records every activation module of the
            network as a hidden layer. An int n keeps only the last activation
            of each block: a module with more than n children is read as a
            sequence of blocks, one per child; smaller modules are searched
            recursively.
        standardize: standardize the inputs U (mean 0, std 1 per feature, from
            the training states) before fitting and in every forward call. The
            states X, Z, Y are left as they are (standardizing them separately
            would break X = φ(Z)). Default False.
        device: where states are kept, solves run and the model lives.
        dtype: dtype of the states and of the fitted model: torch.float32
            (default) or torch.float64.
        max_iter: iteration limit of the fixed-point solve. Default 50000.
        prepare_teacher: fold BatchNorm and rescale the teacher (a copy)
            when that gives an exact well-posed embedding, see above.
            Default True.
        fit_bias: fit biases (a constant-1 input column): None (default)
            when the teacher has biases or BatchNorm or ``standardize`` is
            on (it shifts the inputs), True, or False.
    """

    def __init__(
        self,
        activation_fn: Callable = nn.functional.relu,
        kappa: float = 0.99,
        atol: float = 1e-6,
        skip_layers: Optional[int] = None,
        standardize: bool = False,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        max_iter: int = 50_000,
        prepare_teacher: bool = True,
        fit_bias: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not callable(activation_fn):
            raise TypeError(f"activation_fn must be callable, got {type(activation_fn).__name__}")
        F.check_kappa(kappa)
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (0 <= atol < math.inf):
            raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
        if skip_layers is not None and (isinstance(skip_layers, bool) or not isinstance(skip_layers, int)
                                        or skip_layers < 0):
            raise ValueError(f"skip_layers must be None or an int >= 0, got {skip_layers!r}")
        max_iter = check_positive_int("max_iter", max_iter)
        if not isinstance(prepare_teacher, bool):
            raise TypeError(f"prepare_teacher must be a bool, got {prepare_teacher!r}")
        if fit_bias is not None and not isinstance(fit_bias, bool):
            raise TypeError(f"fit_bias must be None or a bool, got {fit_bias!r}")
        self.activation_fn = activation_fn
        self.kappa, self.atol = float(kappa), float(atol)
        self.skip_layers, self.standardize = skip_layers, bool(standardize)
        self.device, self.dtype = torch.device(device), _as_dtype(dtype)
        self.max_iter = max_iter
        self.prepare_teacher, self.fit_bias = prepare_teacher, fit_bias
        self.implicit_model: Optional[ImplicitModel] = None
        self.fit_info: dict = {}
        self.register_buffer("input_mean", None)
        self.register_buffer("input_std", None)

    # -- nn.Module plumbing -------------------------------------------------

    def to(self, *args, **kwargs):
        """As ``nn.Module.to``; also moves where later states and solves go."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype.is_floating_point:
            _as_dtype(dtype)
        super().to(*args, **kwargs)
        if device is not None:
            self.device = device
        if dtype is not None and dtype.is_floating_point:
            self.dtype = dtype
        return self

    def train(self, solver=None, model: Optional[nn.Module] = None, dataloader=None,
              states_data_path: Optional[Union[str, os.PathLike]] = None,
              save_states_path: Optional[Union[str, os.PathLike]] = None, *,
              mode: Optional[bool] = None):
        """Fit the implicit model (see :meth:`fit`), as torchidl's
        ``SIM.train(solver, model, dataloader, ...)``.

        Called as ``nn.Module.train`` is (no argument, a bool alone, or
        ``mode=``), it sets the training mode instead, so ``sim.eval()``,
        ``sim.train()`` and ``sim.train(mode=False)`` keep their PyTorch meaning.
        """
        wants_fit = any(a is not None for a in (model, dataloader, states_data_path, save_states_path))
        if mode is not None:
            if wants_fit or solver is not None:
                raise TypeError("train(mode=...) sets the training mode; it takes no fit argument")
            return super().train(bool(mode))
        if not wants_fit and (solver is None or isinstance(solver, bool)):
            return super().train(True if solver is None else solver)
        return self.fit(solver, model, dataloader, states_data_path, save_states_path)

    # -- fitting ---------------------------------------------------------------

    def get_states(self, model: nn.Module, dataloader, progress: Optional[bool] = None) -> States:
        """The states of ``model`` on every batch of ``dataloader`` (on this
        SIM's device and dtype, inputs not standardized)."""
        return capture_states(model, dataloader, self.skip_layers, self.device, self.dtype, progress)

    def model_config(self) -> dict:
        """What solvers receive as ``model_config``."""
        return {"activation_fn": self.activation_fn, "device": self.device, "dtype": self.dtype,
                "atol": self.atol, "kappa": self.kappa, "max_iter": self.max_iter}

    def fit(self, solver: Optional[BaseSolver] = None, model: Optional[nn.Module] = None,
            dataloader=None, states_data_path=None, save_states_path=None) -> "SIM":
        """Capture the states of ``model`` on ``dataloader`` (or load them from
        ``states_data_path``), fit A, B, C, D with ``solver`` and build the
        implicit model. See the class docstring for what is done by default
        (teacher preparation on a copy, biases, regenerated states, report).

        Args:
            solver: a :class:`~idl.sim.solvers.BaseSolver`; default
                ``BatchedProxSolver(regen_states=True)``.
            model: the trained explicit network (an ``nn.Module`` with activation
                modules such as ``nn.ReLU``). It runs in eval mode, restored
                after, and is not modified.
            dataloader: batches of ``(inputs, targets)`` (or of inputs alone).
            states_data_path: a file written with ``save_states_path`` (or
                :func:`idl.sim.save_states`); when given, model and dataloader
                are not used.
            save_states_path: where to save the captured states.

        Returns:
            self.
        """
        if solver is None:
            solver = BatchedProxSolver(regen_states=True)
        if not isinstance(solver, BaseSolver) and not callable(getattr(solver, "solve", None)):
            raise TypeError(f"solver must be an idl.sim.solvers.BaseSolver, got {type(solver).__name__}")
        start = time.perf_counter()
        prepared = None
        if states_data_path is None and isinstance(model, nn.Module):
            prepared = prepare_teacher(model, self.activation_fn, self.kappa, rescale=self.prepare_teacher)
            model = prepared.model
        states = self._states(model, dataloader, states_data_path, save_states_path)
        for name in "UXZY":
            if not torch.isfinite(getattr(states, name)).all():
                raise ValueError(f"SIM states: {name} has non-finite values (NaN or inf)")
        fit_bias = self.fit_bias
        if fit_bias is None:  # standardizing shifts the inputs: a bias absorbs the shift
            fit_bias = self.standardize or bool(prepared and prepared.has_bias)
        U = self._standardized_training_inputs(states.U)
        if fit_bias:
            U = torch.cat([U, U.new_ones(U.shape[0], 1)], dim=1)
        logger.info("fitting with %s", type(solver).__name__)
        A, B, C, D = solver.solve(states.X, U, states.Z, states.Y, self.model_config())
        n, p, q = states.X.shape[1], U.shape[1], states.Y.shape[1]
        shapes = {"A": (n, n), "B": (n, p), "C": (q, n), "D": (q, p)}
        A, B, C, D = (_as_weight(w, name, shapes[name], self.device, self.dtype)
                      for name, w in zip("ABCD", (A, B, C, D)))
        biases = {}
        if fit_bias:
            biases = {"bias_hidden": B[:, -1].clone(), "bias_out": D[:, -1].clone()}
            B, D = B[:, :-1].contiguous(), D[:, :-1].contiguous()
        self.implicit_model = implicit_model_from_weights(
            A, B, C, D, self.activation_fn, self.kappa, self.atol, self.max_iter, **biases)
        self._report(states, solver, prepared, fit_bias, time.perf_counter() - start)
        return self

    @torch.no_grad()
    def _report(self, states: States, solver, prepared: Optional[PreparedTeacher], fit_bias: bool,
                seconds: float):
        """The one-line summary of a fit, and the warning when the fitted
        model does not match the teacher."""
        m = min(states.num_samples, REPORT_SAMPLES)
        U, Y = states.U[:m], states.Y[:m]
        if self.input_mean is not None:
            U = (U - self.input_mean) / self.input_std
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fixed point that stalls shows in the error below
            predicted = self.implicit_model(U)
        scale = Y.double().norm().item()
        error = (predicted.double() - Y.double()).norm().item()
        relative = error / scale if scale > 0 else error
        A = self.implicit_model.A.detach()
        norm = A.abs().sum(dim=1, dtype=torch.float64).max().item() if A.numel() else 0.0
        regen = getattr(solver, "regen_states", None)
        self.fit_info = {
            "seconds": seconds, "relative_error": relative, "samples": m,
            "hidden_sizes": list(states.layer_sizes), "input_dim": states.U.shape[1],
            "output_dim": states.Y.shape[1], "bias": fit_bias, "A_norm": norm,
            "solver": type(solver).__name__, "regen_states": regen,
            "teacher": prepared.describe() if prepared is not None else "states from a file",
            "mismatched_activations": list(prepared.mismatched) if prepared is not None else [],
        }
        solver_text = type(solver).__name__ + ("(regen_states=True)" if regen else "")
        logger.info(
            "SIM fit in %.1f s with %s: hidden layers %s (last first, n=%d), p=%d, q=%d, %s; %s; "
            "||A||_inf=%.3g (kappa=%g); fitted outputs vs the teacher's on %d training samples: "
            "relative error %.2e",
            seconds, solver_text, list(states.layer_sizes), states.X.shape[1], states.U.shape[1],
            states.Y.shape[1], "biases fitted" if fit_bias else "no bias", self.fit_info["teacher"],
            norm, self.kappa, m, relative,
        )
        mismatched = self.fit_info["mismatched_activations"]
        if mismatched or not relative <= WARN_RELATIVE_ERROR:
            reason = ""
            if mismatched:
                reason = (f": the teacher's activations {sorted(set(mismatched))} are not "
                          f"activation_fn, so no implicit model with this φ reproduces them exactly")
            warnings.warn(
                f"SIM: the fitted implicit model's outputs differ from the teacher's by "
                f"{relative:.1%} (relative error on {m} training samples){reason}",
                UserWarning, stacklevel=3,
            )

    def _states(self, model, dataloader, states_data_path, save_states_path) -> States:
        if states_data_path is not None:
            if save_states_path is not None:
                logger.warning("both states_data_path and save_states_path given: "
                               "loading from states_data_path, saving nothing")
            if model is not None or dataloader is not None:
                logger.warning("states_data_path given: model and dataloader are not used")
            logger.info("loading states from %s", os.fspath(states_data_path))
            return load_states(states_data_path, device=self.device, dtype=self.dtype)
        if model is None:
            raise ValueError("give either model (with dataloader) or states_data_path")
        if dataloader is None:
            raise ValueError("dataloader is required to capture the states of model")
        states = self.get_states(model, dataloader)
        if save_states_path is not None:
            logger.info("saving states to %s", os.fspath(save_states_path))
            save_states(states, save_states_path)
        return states

    def _standardized_training_inputs(self, U: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            self.input_mean = self.input_std = None
            return U
        self.input_mean = U.mean(dim=0)
        std = U.std(dim=0, unbiased=False)
        self.input_std = torch.where(std > 0, std, torch.ones_like(std))
        return (U - self.input_mean) / self.input_std

    # -- using the fitted model ----------------------------------------------

    def _check_fitted(self):
        if self.implicit_model is None:
            raise RuntimeError("SIM is not fitted yet: call sim.train(solver, model, dataloader) first")

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        """Outputs (batch, output_dim) of the fitted implicit model on inputs U
        (batch, ...), flattened from dim 1 (a 1-D U is (batch, 1)) and moved
        to the SIM's device/dtype."""
        self._check_fitted()
        if not isinstance(U, torch.Tensor):
            raise TypeError(f"U must be a torch.Tensor, got {type(U).__name__}")
        if U.dim() == 0:
            raise ValueError("U must have shape (batch, features...) or (batch,), got a 0-d tensor")
        params = self.implicit_model.B
        U = as_rows(U, "U").to(device=params.device, dtype=params.dtype)
        if self.input_mean is not None:
            U = (U - self.input_mean) / self.input_std
        return self.implicit_model(U)

    @property
    def weights(self) -> dict:
        """The fitted A, B, C, D (detached), as torchidl's ``sim.weights``,
        with ``bias_hidden`` and ``bias_out`` when biases were fitted."""
        self._check_fitted()
        names = ("A", "B", "C", "D") + (("bias_hidden", "bias_out") if self.implicit_model.bias else ())
        return {name: getattr(self.implicit_model, name).detach() for name in names}

    @torch.no_grad()
    def evaluate(self, dataloader) -> float:
        """Classification accuracy (a fraction in [0, 1]) of the fitted model on
        every batch ``(inputs, targets)`` of ``dataloader``: argmax of the
        outputs against class indices (or against the argmax of one-hot /
        score targets)."""
        self._check_fitted()
        correct, total = 0, 0
        for batch in dataloader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("evaluate needs batches of (inputs, targets)")
            inputs, targets = batch[0], batch[1]
            predicted = self(inputs).argmax(dim=1).cpu()
            targets = torch.as_tensor(targets).cpu()
            if targets.dim() == 2:
                targets = targets.argmax(dim=1)
            correct += (predicted == targets).sum().item()
            total += targets.numel()
        if total == 0:
            raise ValueError("dataloader yielded no sample")
        accuracy = correct / total
        logger.info("SIM accuracy: %.2f%% (%d/%d)", 100 * accuracy, correct, total)
        return accuracy
