"""The install users get who are not developing idl: a wheel built from this
tree, unpacked into a directory of its own and imported from outside the
source tree, with every subpackage (idl.sim and its solvers) in it."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter whose cwd and sys.path hold no source tree: only
# the unpacked wheel (and site-packages, for torch) can provide `idl`.
SMOKE = r"""
import os, sys
import torch
import idl
from idl.sim import SIM
from idl.sim.solvers import BatchedProxSolver, ADMMSolver, LeastSquareSolver, CVXSolver
target = sys.argv[1]
assert os.path.realpath(idl.__file__).startswith(os.path.realpath(target)), idl.__file__
torch.manual_seed(0)
model = idl.ImplicitModel(4, 2, 8)
model(torch.randn(5, 4)).sum().backward()
teacher = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.ReLU(),
                              torch.nn.Linear(6, 2, bias=False))
data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.zeros(64, dtype=torch.long))
loader = torch.utils.data.DataLoader(data, batch_size=32)
sim = SIM(activation_fn=torch.nn.functional.relu)
sim.train(solver=BatchedProxSolver(progress=False), model=teacher, dataloader=loader)
print("ok", sim.implicit_model(torch.randn(3, 4)).shape)
"""


@pytest.mark.slow
def test_wheel_installs_every_subpackage_and_runs_outside_the_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-w", str(wheels), ROOT],
        check=True, cwd=tmp_path, env={**os.environ, "IDL_CUDA": "0"},
    )
    (wheel,) = wheels.glob("idl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("idl/__init__.py", "idl/sim/__init__.py", "idl/sim/solvers/__init__.py",
                   "idl/sim/solvers/batched.py"):
        assert module in names, f"{module} missing from {wheel.name}"
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    # -I would drop PYTHONPATH too; -P keeps cwd off sys.path (Python >= 3.11)
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    result = subprocess.run([sys.executable, *flags, "-c", SMOKE, str(target)], cwd=outside,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok torch.Size([3, 2])"
