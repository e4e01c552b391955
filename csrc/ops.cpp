// ops.cpp: the idl:: custom ops. Schemas, tensor checks, and dispatch to the
// C kernels of csrc/cpu (declared in idl.h). No numerics live here.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "idl.h"

namespace {

// ---- the C kernels by element type ------------------------------------------

template <typename T>
struct Kernels;

template <>
struct Kernels<float> {
    static constexpr auto project = idl_project_linf_f32;
    static constexpr auto project_backward = idl_project_linf_backward_f32;
    static constexpr auto fixed_point = idl_fixed_point_f32;
    static constexpr auto adjoint = idl_adjoint_f32;
};

template <>
struct Kernels<double> {
    static constexpr auto project = idl_project_linf_f64;
    static constexpr auto project_backward = idl_project_linf_backward_f64;
    static constexpr auto fixed_point = idl_fixed_point_f64;
    static constexpr auto adjoint = idl_adjoint_f64;
};

// ---- argument checks ----------------------------------------------------------

void check_floating(const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "idl: ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_matrix(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2, "idl: ", name, " must be a 2-D tensor, got ",
                      t.dim(), "-D");
    check_floating(t, name);
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                const char* ref_name) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "idl: ", name, " has dtype ",
                     t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
    TORCH_CHECK_VALUE(t.device() == ref.device(), "idl: ", name, " is on ", t.device(),
                      " but ", ref_name, " is on ", ref.device());
}

void check_kappa(double kappa) {
    TORCH_CHECK_VALUE(kappa > 0.0 && kappa <= 1.0, "idl: kappa must be in (0, 1], got ",
                      kappa);
}

idl_projection parse_projection(c10::string_view mode) {
    if (mode == "exact") return IDL_PROJECT_EXACT;
    if (mode == "scale") return IDL_PROJECT_SCALE;
    TORCH_CHECK_VALUE(false, "idl: projection mode must be 'exact' or 'scale', got '",
                      std::string(mode), "'");
}

idl_act parse_activation(c10::string_view name, double slope) {
    static const std::pair<const char*, idl_activation> known[] = {
        {"identity", IDL_IDENTITY}, {"relu", IDL_RELU},         {"leaky_relu", IDL_LEAKY_RELU},
        {"tanh", IDL_TANH},         {"hardtanh", IDL_HARDTANH}, {"sigmoid", IDL_SIGMOID},
        {"softplus", IDL_SOFTPLUS}};
    for (const auto& entry : known)
        if (name == entry.first) return idl_act{entry.second, slope};
    TORCH_CHECK_VALUE(false, "idl: unknown activation '", std::string(name), "'");
}

// Anderson's ridge, relative to the mean diagonal of the Gram matrix: enough
// to keep the small systems solvable, far below what would slow convergence.
constexpr double kAndersonRegularization = 1e-10;

idl_solver parse_solver(c10::string_view method, int64_t max_iter, double tol, int64_t memory) {
    TORCH_CHECK_VALUE(max_iter >= 1, "idl: max_iter must be >= 1, got ", max_iter);
    TORCH_CHECK_VALUE(tol >= 0.0, "idl: tol must be >= 0, got ", tol);
    idl_solver solver{IDL_PICARD, max_iter, tol, memory, kAndersonRegularization};
    if (method == "anderson") {
        TORCH_CHECK_VALUE(memory >= 1 && memory <= IDL_ANDERSON_MAX_MEMORY,
                          "idl: anderson memory must be in [1, ", IDL_ANDERSON_MAX_MEMORY,
                          "], got ", memory);
        solver.method = IDL_ANDERSON;
    } else {
        TORCH_CHECK_VALUE(method == "picard", "idl: method must be 'picard' or 'anderson', got '",
                          std::string(method), "'");
    }
    return solver;
}

at::Tensor stats_tensor(const idl_stats& s) {
    auto out = at::empty({3}, at::TensorOptions().dtype(at::kDouble));
    auto* p = out.data_ptr<double>();
    p[0] = static_cast<double>(s.iterations);
    p[1] = s.residual;
    p[2] = s.converged ? 1.0 : 0.0;
    return out;
}

// ---- GEMM for the solver loop: out = left · M through ATen ------------------

struct RightFactor {
    at::Tensor matrix;  // n x n, possibly a transposed view
};

void matmul_by_factor(void* ctx, int64_t rows, const void* left, void* out) {
    const auto& m = static_cast<RightFactor*>(ctx)->matrix;
    const int64_t n = m.size(0);
    auto opts = m.options();
    auto left_t = at::from_blob(const_cast<void*>(left), {rows, n}, opts);
    auto out_t = at::from_blob(out, {rows, n}, opts);
    at::mm_out(out_t, left_t, m);
}

at::Tensor workspace_for(int64_t m, int64_t n, const at::Tensor& like, const idl_solver& solver) {
    return at::empty({idl_solve_workspace_bytes(m, n, like.element_size(), solver)},
                     like.options().dtype(at::kByte));
}

// ---- CPU implementations ----------------------------------------------------

at::Tensor project_linf_cpu(const at::Tensor& A, double kappa, c10::string_view mode) {
    check_matrix(A, "A");
    check_kappa(kappa);
    const auto how = parse_projection(mode);
    auto a = A.contiguous();
    auto out = at::empty_like(a);
    auto scratch = at::empty({a.size(1)}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf", [&] {
        Kernels<scalar_t>::project(how, a.size(0), a.size(1), a.const_data_ptr<scalar_t>(),
                                   a.stride(0), kappa, out.data_ptr<scalar_t>(),
                                   scratch.data_ptr<scalar_t>());
    });
    return out;
}

at::Tensor project_linf_backward_cpu(const at::Tensor& grad, const at::Tensor& A, double kappa,
                                     c10::string_view mode) {
    check_matrix(A, "A");
    check_same(grad, A, "grad", "A");
    TORCH_CHECK_VALUE(grad.sizes() == A.sizes(), "idl: grad must have the shape of A");
    check_kappa(kappa);
    const auto how = parse_projection(mode);
    auto a = A.contiguous();
    auto g = grad.contiguous();
    auto out = at::empty_like(a);
    auto scratch = at::empty({a.size(1)}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "idl::project_linf_backward", [&] {
        Kernels<scalar_t>::project_backward(
            how, a.size(0), a.size(1), a.const_data_ptr<scalar_t>(), a.stride(0), kappa,
            g.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), scratch.data_ptr<scalar_t>());
    });
    return out;
}

void check_square_with(const at::Tensor& A, const at::Tensor& rows, const char* rows_name) {
    check_matrix(A, "A");
    check_matrix(rows, rows_name);
    check_same(rows, A, rows_name, "A");
    TORCH_CHECK_VALUE(A.size(0) == A.size(1), "idl: A must be square, got ", A.sizes());
    TORCH_CHECK_VALUE(rows.size(1) == A.size(0), "idl: ", rows_name, " must have ", A.size(0),
                      " columns (the hidden size), got ", rows.size(1));
}

// Forward solve. grad_max_iter and grad_tol are the settings of the implicit
// backward (which uses the same method and memory): the autograd formula in
// idl/_ops.py reads them; the solve itself does not.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_point_cpu(
    const at::Tensor& A, const at::Tensor& C0, const c10::optional<at::Tensor>& X0,
    c10::string_view activation, double slope, int64_t max_iter, double tol,
    int64_t grad_max_iter, double grad_tol, c10::string_view method, int64_t memory) {
    check_square_with(A, C0, "C0");
    const auto act = parse_activation(activation, slope);
    const auto solver = parse_solver(method, max_iter, tol, memory);
    parse_solver(method, grad_max_iter, grad_tol, memory);
    auto c0 = C0.contiguous();
    at::Tensor x0;
    if (X0.has_value()) {
        check_same(*X0, C0, "X0", "C0");
        TORCH_CHECK_VALUE(X0->sizes() == C0.sizes(), "idl: X0 must have shape ", C0.sizes(),
                          ", got ", X0->sizes());
        x0 = X0->contiguous();
    } else {
        x0 = at::zeros_like(c0);
    }
    const int64_t m = c0.size(0), n = c0.size(1);
    auto x = at::empty_like(c0);
    auto z = at::empty_like(c0);
    auto work = workspace_for(m, n, c0, solver);
    RightFactor at_factor{A.t()};
    idl_matmul mm{matmul_by_factor, &at_factor};
    idl_stats stats;
    AT_DISPATCH_FLOATING_TYPES(c0.scalar_type(), "idl::fixed_point", [&] {
        stats = Kernels<scalar_t>::fixed_point(m, n, mm, c0.const_data_ptr<scalar_t>(),
                                               x0.const_data_ptr<scalar_t>(), act, solver,
                                               x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                               work.data_ptr());
    });
    return {x, z, stats_tensor(stats)};
}

std::tuple<at::Tensor, at::Tensor> fixed_point_adjoint_cpu(const at::Tensor& A, const at::Tensor& Z,
                                                           const at::Tensor& G,
                                                           c10::string_view activation,
                                                           double slope, int64_t max_iter,
                                                           double tol, c10::string_view method,
                                                           int64_t memory) {
    check_square_with(A, Z, "Z");
    check_same(G, Z, "G", "Z");
    TORCH_CHECK_VALUE(G.sizes() == Z.sizes(), "idl: G must have shape ", Z.sizes(), ", got ",
                      G.sizes());
    const auto act = parse_activation(activation, slope);
    const auto solver = parse_solver(method, max_iter, tol, memory);
    auto z = Z.contiguous();
    auto g = G.contiguous();
    const int64_t m = z.size(0), n = z.size(1);
    auto v = at::empty_like(z);
    auto work = workspace_for(m, n, z, solver);
    RightFactor a_factor{A};
    idl_matmul mm{matmul_by_factor, &a_factor};
    idl_stats stats;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "idl::fixed_point_adjoint", [&] {
        stats = Kernels<scalar_t>::adjoint(m, n, mm, z.const_data_ptr<scalar_t>(),
                                           g.const_data_ptr<scalar_t>(), act, solver,
                                           v.data_ptr<scalar_t>(), work.data_ptr());
    });
    return {v, stats_tensor(stats)};
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
}

TORCH_LIBRARY_IMPL(idl, CPU, m) {
    m.impl("project_linf", &project_linf_cpu);
    m.impl("project_linf_backward", &project_linf_backward_cpu);
    m.impl("fixed_point", &fixed_point_cpu);
    m.impl("fixed_point_adjoint", &fixed_point_adjoint_cpu);
}

// `import idl._C` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module);
}
