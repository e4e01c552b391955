// ops.cpp: the idl:: custom ops. Schemas, tensor checks, and dispatch to the
// C kernels of csrc/cpu (declared in idl.h). No numerics live here.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "aten_matmul.h"
#include "checks.h"
#include "idl.h"
#include "serial_blas.h"

#include <cmath>

namespace {

using namespace idl_checks;
using idl_glue::matmul_by_factor;
using idl_glue::RightFactor;
using idl_glue::SerialBlasIfSmall;

// ---- the C kernels by element type ------------------------------------------

template <typename T>
struct Kernels;

template <>
struct Kernels<float> {
    static constexpr auto all_finite = idl_all_finite_f32;
    static constexpr auto project = idl_project_linf_f32;
    static constexpr auto project_backward = idl_project_linf_backward_f32;
    static constexpr auto fixed_point = idl_fixed_point_f32;
    static constexpr auto adjoint = idl_adjoint_f32;
    static constexpr auto phantom = idl_phantom_adjoint_f32;
};

template <>
struct Kernels<double> {
    static constexpr auto all_finite = idl_all_finite_f64;
    static constexpr auto project = idl_project_linf_f64;
    static constexpr auto project_backward = idl_project_linf_backward_f64;
    static constexpr auto fixed_point = idl_fixed_point_f64;
    static constexpr auto adjoint = idl_adjoint_f64;
    static constexpr auto phantom = idl_phantom_adjoint_f64;
};

// [iterations, residual, converged], converged being a code (idl/_stats.py):
// 0 not converged, 1 every sample met the absolute test (residual <= tol), 2
// some sample stopped on the relative part (tol < residual <= tol + rtol
// ||g(x)||_inf), 3 a fixed number of steps with no test (phantom backward).
at::Tensor stats_tensor(const idl_stats& s, double converged_code = 0.0) {
    auto out = at::empty({3}, at::TensorOptions().dtype(at::kDouble));
    auto* p = out.data_ptr<double>();
    p[0] = static_cast<double>(s.iterations);
    p[1] = s.residual;
    p[2] = converged_code != 0.0 ? converged_code
           : !s.converged        ? 0.0
           : s.relative_stops > 0 ? 2.0
                                  : 1.0;
    return out;
}

at::Tensor workspace_for(int64_t m, int64_t n, const at::Tensor& like, const idl_solver& solver) {
    return at::empty({idl_solve_workspace_bytes(m, n, like.element_size(), solver)},
                     like.options().dtype(at::kByte));
}

// ---- non-finite inputs of a forward solve ----------------------------------

// NaN or Inf in a forward solve's matrix A or offsets C0 could hide from its
// iterates (a saturating φ maps Inf to a finite value; ReLU units all dead
// never read A), so they are looked for once, before iterating (the CUDA
// solve does the same on the device), by the C kernels' vectorised pass.
template <typename T>
bool all_finite(const at::Tensor& t) {
    const auto values = t.contiguous();
    return Kernels<T>::all_finite(values.numel(), values.const_data_ptr<T>()) != 0;
}

// (X, Z, stats) of a solve whose inputs are not finite: stopped before its
// first iteration, NaN everywhere, reported as not converged.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unsolved_nonfinite(const at::Tensor& c0) {
    auto nan = at::full_like(c0, NAN);
    idl_stats stopped{};
    stopped.residual = NAN;
    return {nan, nan.clone(), stats_tensor(stopped)};
}

// ---- CPU implementations ----------------------------------------------------

at::Tensor project_linf_cpu(const at::Tensor& A, double kappa, c10::string_view mode) {
    const auto how = check_project_args(A, kappa, mode);
    auto a = A.contiguous();
    auto out = at::empty_like(a);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf", [&] {
        Kernels<scalar_t>::project(how, a.size(0), a.size(1), a.const_data_ptr<scalar_t>(),
                                   a.stride(0), kappa, out.data_ptr<scalar_t>());
    });
    return out;
}

at::Tensor project_linf_backward_cpu(const at::Tensor& grad, const at::Tensor& A, double kappa,
                                     c10::string_view mode) {
    const auto how = check_project_backward_args(grad, A, kappa, mode);
    auto a = A.contiguous();
    auto g = grad.contiguous();
    auto out = at::empty_like(a);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf_backward", [&] {
        Kernels<scalar_t>::project_backward(how, a.size(0), a.size(1),
                                            a.const_data_ptr<scalar_t>(), a.stride(0), kappa,
                                            g.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cpu(const at::Tensor& A,
                                                        const at::Tensor& C0,
                                                        const c10::optional<at::Tensor>& X0,
                                                        const SolveArgs& args) {
    auto c0 = C0.contiguous();
    auto x0 = X0.has_value() ? X0->contiguous() : at::Tensor();  // undefined: start at 0
    const int64_t m = c0.size(0), n = c0.size(1);
    auto x = at::empty_like(c0);
    auto z = at::empty_like(c0);
    auto work = workspace_for(m, n, c0, args.solver);
    SerialBlasIfSmall serial(c0.device(), m * n * n);
    RightFactor at_factor{A.t()};
    idl_matmul mm{matmul_by_factor, &at_factor};
    idl_stats stats;
    bool finite = true;
    AT_DISPATCH_FLOATING_TYPES(c0.scalar_type(), "idl::fixed_point", [&] {
        finite = all_finite<scalar_t>(A) && all_finite<scalar_t>(c0);
    });
    if (!finite) return unsolved_nonfinite(c0);
    AT_DISPATCH_FLOATING_TYPES(c0.scalar_type(), "idl::fixed_point", [&] {
        const scalar_t* start = x0.defined() ? x0.const_data_ptr<scalar_t>() : nullptr;
        stats = Kernels<scalar_t>::fixed_point(m, n, mm, c0.const_data_ptr<scalar_t>(), start,
                                               args.act, args.solver, x.data_ptr<scalar_t>(),
                                               z.data_ptr<scalar_t>(), work.data_ptr());
    });
    at_factor.rethrow_error();
    return {x, z, stats_tensor(stats)};
}

// Forward solve. grad_max_iter and grad_tol are only checked (see checks.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_cpu(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol,
    int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory) {
    const auto args = check_fixed_point_args(A, C0, X0, activation, slope, max_iter, tol,
                                             grad_max_iter, grad_tol, method, memory);
    return solve_cpu(A, C0, X0, args);
}

// Forward solve with a relative tolerance (and any method).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_rel_cpu(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol, double rtol,
    c10::string_view method, int64_t memory) {
    const auto args = check_fixed_point_rel_args(A, C0, X0, activation, slope, max_iter, tol, rtol,
                                                 method, memory);
    return solve_cpu(A, C0, X0, args);
}

std::tuple<at::Tensor, at::Tensor> adjoint_cpu(const at::Tensor& A, const at::Tensor& Z,
                                               const at::Tensor& G, const SolveArgs& args) {
    auto z = Z.contiguous();
    auto g = G.contiguous();
    const int64_t m = z.size(0), n = z.size(1);
    auto v = at::empty_like(z);
    auto work = workspace_for(m, n, z, args.solver);
    SerialBlasIfSmall serial(z.device(), m * n * n);
    RightFactor a_factor{A};
    idl_matmul mm{matmul_by_factor, &a_factor};
    idl_stats stats;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "idl::fixed_point_adjoint", [&] {
        stats = Kernels<scalar_t>::adjoint(m, n, mm, z.const_data_ptr<scalar_t>(),
                                           g.const_data_ptr<scalar_t>(), args.act, args.solver,
                                           v.data_ptr<scalar_t>(), work.data_ptr());
    });
    a_factor.rethrow_error();
    return {v, stats_tensor(stats)};
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_cpu(const at::Tensor& A, const at::Tensor& Z,
                                                           const at::Tensor& G,
                                                           c10::string_view activation,
                                                           double slope, int64_t max_iter,
                                                           double tol, c10::string_view method,
                                                           int64_t memory) {
    return adjoint_cpu(A, Z, G,
                       check_adjoint_args(A, Z, G, activation, slope, max_iter, tol, method, memory));
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_rel_cpu(
    const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G, c10::string_view activation,
    double slope, int64_t max_iter, double tol, double rtol, c10::string_view method,
    int64_t memory) {
    return adjoint_cpu(
        A, Z, G,
        check_adjoint_args(A, Z, G, activation, slope, max_iter, tol, method, memory, rtol));
}

// Phantom adjoint: `steps` damped adjoint steps (idl.h); steps 1, tau 1 is JFB.
std::tuple<at::Tensor, at::Tensor> phantom_adjoint_cpu(const at::Tensor& A, const at::Tensor& Z,
                                                       const at::Tensor& G,
                                                       c10::string_view activation, double slope,
                                                       int64_t steps, double tau) {
    const auto act = check_phantom_args(A, Z, G, activation, slope, steps, tau);
    auto z = Z.contiguous();
    auto g = G.contiguous();
    const int64_t m = z.size(0), n = z.size(1);
    auto v = at::empty_like(z);
    auto work = at::empty({idl_phantom_workspace_bytes(m, n, z.element_size())},
                          z.options().dtype(at::kByte));
    SerialBlasIfSmall serial(z.device(), m * n * n);
    RightFactor a_factor{A};
    idl_matmul mm{matmul_by_factor, &a_factor};
    idl_stats stats;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "idl::phantom_adjoint", [&] {
        stats = Kernels<scalar_t>::phantom(m, n, mm, z.const_data_ptr<scalar_t>(),
                                           g.const_data_ptr<scalar_t>(), act, steps, tau,
                                           v.data_ptr<scalar_t>(), work.data_ptr());
    });
    a_factor.rethrow_error();
    return {v, stats_tensor(stats, 3.0)};
}

}  // namespace

TORCH_LIBRARY(idl, m) {
    m.def("project_linf(Tensor A, float kappa, str mode) -> Tensor");
    m.def("project_linf_backward(Tensor grad, Tensor A, float kappa, str mode) -> Tensor");
    m.def(
        "fixed_point(Tensor A, Tensor C0, Tensor? X0, str activation, float slope, "
        "int max_iter, float tol, int grad_max_iter, float grad_tol, str method=\"picard\", "
        "int memory=5) -> (Tensor X, Tensor Z, Tensor stats)");
    m.def(
        "fixed_point_adjoint(Tensor A, Tensor Z, Tensor G, str activation, float slope, "
        "int max_iter, float tol, str method=\"picard\", int memory=5) "
        "-> (Tensor V, Tensor stats)");
    // The solves with a relative tolerance or method "auto", and the phantom /
    // JFB backward; idl::implicit_layer calls them only when those settings
    // are asked for.
    m.def(
        "fixed_point_rel(Tensor A, Tensor C0, Tensor? X0, str activation, float slope, "
        "int max_iter, float tol, float rtol, str method, int memory) "
        "-> (Tensor X, Tensor Z, Tensor stats)");
    m.def(
        "fixed_point_adjoint_rel(Tensor A, Tensor Z, Tensor G, str activation, float slope, "
        "int max_iter, float tol, float rtol, str method, int memory) -> (Tensor V, Tensor stats)");
    m.def(
        "phantom_adjoint(Tensor A, Tensor Z, Tensor G, str activation, float slope, int steps, "
        "float tau) -> (Tensor V, Tensor stats)");
}

TORCH_LIBRARY_IMPL(idl, CPU, m) {
    m.impl("project_linf", &project_linf_cpu);
    m.impl("project_linf_backward", &project_linf_backward_cpu);
    m.impl("fixed_point", &fixed_point_cpu);
    m.impl("fixed_point_adjoint", &fixed_point_adjoint_cpu);
    m.impl("fixed_point_rel", &fixed_point_rel_cpu);
    m.impl("fixed_point_adjoint_rel", &fixed_point_adjoint_rel_cpu);
    m.impl("phantom_adjoint", &phantom_adjoint_cpu);
}

namespace {

// module.name = value, taking the new reference `value` (NULL: a failure
// already raised). False, with the Python error set, on failure.
bool add_attribute(PyObject* module, const char* name, PyObject* value) {
    if (value == nullptr) return false;
    if (PyModule_AddObject(module, name, value) == 0) return true;
    Py_DECREF(value);
    return false;
}

// The solver registry of idl.h, as attributes of idl._C: idl/functional.py
// reads the method names, limits and defaults from these.
bool add_solver_registry(PyObject* module) {
    PyObject* methods = PyTuple_New(IDL_METHOD_COUNT);
    if (methods == nullptr) return false;
    for (int m = 0; m < IDL_METHOD_COUNT; ++m) {
        PyObject* name = PyUnicode_FromString(idl_method_name(m));
        if (name == nullptr) {
            Py_DECREF(methods);
            return false;
        }
        PyTuple_SET_ITEM(methods, m, name);
    }
    return add_attribute(module, "SOLVER_METHODS", methods) &&
           PyModule_AddIntConstant(module, "ANDERSON_MAX_MEMORY", IDL_ANDERSON_MAX_MEMORY) == 0 &&
           PyModule_AddIntConstant(module, "ANDERSON_MAX_RESTARTS", IDL_ANDERSON_MAX_RESTARTS) == 0 &&
           add_attribute(module, "ANDERSON_REGULARIZATION",
                         PyFloat_FromDouble(IDL_ANDERSON_REGULARIZATION)) &&
           add_attribute(module, "AUTO_SWITCH_RATIO", PyFloat_FromDouble(IDL_AUTO_SWITCH_RATIO)) &&
           PyModule_AddIntConstant(module, "AUTO_SWITCH_PATIENCE", IDL_AUTO_SWITCH_PATIENCE) == 0;
}

}  // namespace

// `import idl._C` loads this library, which registers the ops above, and
// makes the module that holds the solver registry.
extern "C" PyObject* PyInit__C(void) {
    static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    PyObject* module = PyModule_Create(&definition);
    if (module != nullptr && !add_solver_registry(module)) Py_CLEAR(module);
    return module;
}
