"""The C kernels of csrc/cpu under a kernel-level test program
(tests/kernels/test_kernels.c, no torch): optimised, under AddressSanitizer +
UndefinedBehaviorSanitizer, and under valgrind memcheck. Driven through
tests/kernels/Makefile; skipped where make, a C compiler with the sanitizer
runtimes, or valgrind is missing."""
import os
import shutil
import subprocess

import pytest

KERNELS = os.path.join(os.path.dirname(__file__), "kernels")
GROUPS = [
    "projection", "projection_edges", "projection_huge", "dphi",
    "solves", "solve_edges", "solve_stopping", "solve_magnitudes",
]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def compiler():
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A build directory, after checking that the compiler works."""
    if compiler() is None:
        pytest.skip("no C compiler")
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="module")
def sanitizers(build):
    """Skips unless the compiler can link a program with ASan + UBSan."""
    source = build / "probe.c"
    source.write_text("int main(void) { return 0; }\n")
    probe = subprocess.run(
        [compiler(), "-fsanitize=address,undefined", str(source), "-o", str(build / "probe")],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"the compiler cannot build with sanitizers: {probe.stderr.strip()[:200]}")


def make(target, build_dir, groups, **variables):
    settings = {"BUILD": str(build_dir), "GROUPS": " ".join(groups), "CC": compiler(), **variables}
    command = ["make", "-s", "-C", KERNELS, target] + [f"{k}={v}" for k, v in settings.items()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def assert_clean(returncode, output):
    assert returncode == 0, output[-6000:]
    assert " 0 failed" in output, output[-6000:]


def test_kernels_optimised(build):
    assert_clean(*make("check", build / "plain", GROUPS))


def test_kernels_under_address_and_undefined_behaviour_sanitizers(build, sanitizers):
    assert_clean(*make("asan", build / "asan", GROUPS))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_kernels_under_valgrind_memcheck(build):
    assert_clean(*make("valgrind", build / "valgrind", GROUPS))


def test_the_sanitizer_build_does_catch_an_overflow(build, sanitizers):
    """The harness is not vacuous: the same flags stop a heap overflow."""
    source = build / "overflow.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "int main(void) { volatile int *p = malloc(4 * sizeof *p); p[4] = 1; free((void *)p); return 0; }\n"
    )
    binary = build / "overflow"
    subprocess.run([compiler(), "-g", "-fsanitize=address,undefined", str(source), "-o", str(binary)],
                   check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr
