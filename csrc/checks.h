// checks.h: argument checks of the idl:: ops, shared by the CPU glue
// (csrc/ops.cpp) and the CUDA glue (csrc/cuda/ops_cuda.cpp) so that both
// devices accept and reject exactly the same arguments with the same messages.
#ifndef IDL_CHECKS_H
#define IDL_CHECKS_H

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>

#include "idl.h"

namespace idl_checks {

inline void check_floating(const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "idl: ", name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_matrix(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 2, "idl: ", name, " must be a 2-D tensor, got ",
                      t.dim(), "-D");
    check_floating(t, name);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "idl: ", name, " has dtype ",
                     t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
    TORCH_CHECK_VALUE(t.device() == ref.device(), "idl: ", name, " is on ", t.device(),
                      " but ", ref_name, " is on ", ref.device());
}

inline void check_kappa(double kappa) {
    TORCH_CHECK_VALUE(kappa > 0.0 && kappa <= 1.0, "idl: kappa must be in (0, 1], got ",
                      kappa);
}

inline idl_projection parse_projection(c10::string_view mode) {
    if (mode == "exact") return IDL_PROJECT_EXACT;
    if (mode == "scale") return IDL_PROJECT_SCALE;
    TORCH_CHECK_VALUE(false, "idl: projection mode must be 'exact' or 'scale', got '",
                      std::string(mode), "'");
}

inline idl_act parse_activation(c10::string_view name, double slope) {
    static const std::pair<const char*, idl_activation> known[] = {
        {"identity", IDL_IDENTITY}, {"relu", IDL_RELU},         {"leaky_relu", IDL_LEAKY_RELU},
        {"tanh", IDL_TANH},         {"hardtanh", IDL_HARDTANH}, {"sigmoid", IDL_SIGMOID},
        {"softplus", IDL_SOFTPLUS}};
    for (const auto& entry : known)
        if (name == entry.first) return idl_act{entry.second, slope};
    TORCH_CHECK_VALUE(false, "idl: unknown activation '", std::string(name), "'");
}

// The method names (idl.h's registry) as Python writes a tuple of them,
// "('picard', 'anderson', 'auto')": the list the error message gives, which
// idl/functional.py's (from idl._C.SOLVER_METHODS) repeats to the letter.
inline const std::string& method_names() {
    static const std::string text = [] {
        std::string names = "(";
        for (int m = 0; m < IDL_METHOD_COUNT; ++m)
            names += std::string(m ? ", '" : "'") + idl_method_name(m) + "'";
        return names + ")";
    }();
    return text;
}

inline idl_method parse_method(c10::string_view name) {
    for (int m = 0; m < IDL_METHOD_COUNT; ++m)
        if (name == idl_method_name(m)) return static_cast<idl_method>(m);
    TORCH_CHECK_VALUE(false, "idl: method must be one of ", method_names(), ", got '",
                      std::string(name), "'");
}

// method: "picard", "anderson" or "auto" (Picard, each sample switching to
// Anderson once it contracts slowly: see idl.h). rtol: the relative part of the
// stopping test, tol + rtol ||g(x)||_inf.
inline idl_solver parse_solver(c10::string_view method, int64_t max_iter, double tol,
                               int64_t memory, const char* max_iter_name = "max_iter",
                               const char* tol_name = "tol", double rtol = 0.0,
                               const char* rtol_name = "rtol") {
    TORCH_CHECK_VALUE(max_iter >= 1, "idl: ", max_iter_name, " must be >= 1, got ", max_iter);
    TORCH_CHECK_VALUE(tol >= 0.0 && std::isfinite(tol), "idl: ", tol_name,
                      " must be a finite number >= 0, got ", tol);
    TORCH_CHECK_VALUE(rtol >= 0.0 && std::isfinite(rtol), "idl: ", rtol_name,
                      " must be a finite number >= 0, got ", rtol);
    // switch_ratio, switch_patience 0: idl.h's defaults
    const idl_solver solver{parse_method(method), max_iter, tol, memory,
                            IDL_ANDERSON_REGULARIZATION, rtol, 0.0, 0};
    TORCH_CHECK_VALUE(solver.method == IDL_PICARD ||
                          (memory >= 1 && memory <= IDL_ANDERSON_MAX_MEMORY),
                      "idl: anderson memory must be in [1, ", IDL_ANDERSON_MAX_MEMORY, "], got ",
                      memory);
    return solver;
}

inline void check_square_with(const at::Tensor& A, const at::Tensor& rows,
                              const char* rows_name) {
    check_matrix(A, "A");
    check_matrix(rows, rows_name);
    check_same(rows, A, rows_name, "A");
    TORCH_CHECK_VALUE(A.size(0) == A.size(1), "idl: A must be square, got ", A.sizes());
    TORCH_CHECK_VALUE(rows.size(1) == A.size(0), "idl: ", rows_name, " must have ", A.size(0),
                      " columns (the hidden size), got ", rows.size(1));
}

// ---- the arguments of each op, checked and parsed -----------------------------

inline idl_projection check_project_args(const at::Tensor& A, double kappa,
                                         c10::string_view mode) {
    check_matrix(A, "A");
    check_kappa(kappa);
    return parse_projection(mode);
}

inline idl_projection check_project_backward_args(const at::Tensor& grad, const at::Tensor& A,
                                                  double kappa, c10::string_view mode) {
    check_matrix(A, "A");
    check_same(grad, A, "grad", "A");
    TORCH_CHECK_VALUE(grad.sizes() == A.sizes(), "idl: grad must have the shape of A");
    check_kappa(kappa);
    return parse_projection(mode);
}

struct SolveArgs {
    idl_act act;
    idl_solver solver;
};

// grad_max_iter and grad_tol are the settings of the implicit backward (which
// uses the same method and memory): the autograd formula (idl/_ops.py) reads
// them; they are checked here so that a bad value fails at the forward call
// rather than in backward.
inline SolveArgs check_fixed_point_args(const at::Tensor& A, const at::Tensor& C0,
                                        const c10::optional<at::Tensor>& X0,
                                        c10::string_view activation, double slope,
                                        int64_t max_iter, double tol, int64_t grad_max_iter,
                                        double grad_tol, c10::string_view method,
                                        int64_t memory) {
    check_square_with(A, C0, "C0");
    const SolveArgs args{parse_activation(activation, slope),
                         parse_solver(method, max_iter, tol, memory)};
    parse_solver(method, grad_max_iter, grad_tol, memory, "grad_max_iter", "grad_tol");
    if (X0.has_value()) {
        check_same(*X0, C0, "X0", "C0");
        TORCH_CHECK_VALUE(X0->sizes() == C0.sizes(), "idl: X0 must have shape ", C0.sizes(),
                          ", got ", X0->sizes());
    }
    return args;
}

// The solves with a relative tolerance or method "auto" (idl::fixed_point_rel
// and idl::fixed_point_adjoint_rel).
inline SolveArgs check_fixed_point_rel_args(const at::Tensor& A, const at::Tensor& C0,
                                            const c10::optional<at::Tensor>& X0,
                                            c10::string_view activation, double slope,
                                            int64_t max_iter, double tol, double rtol,
                                            c10::string_view method, int64_t memory) {
    check_square_with(A, C0, "C0");
    if (X0.has_value()) {
        check_same(*X0, C0, "X0", "C0");
        TORCH_CHECK_VALUE(X0->sizes() == C0.sizes(), "idl: X0 must have shape ", C0.sizes(),
                          ", got ", X0->sizes());
    }
    return SolveArgs{parse_activation(activation, slope),
                     parse_solver(method, max_iter, tol, memory, "max_iter", "tol", rtol)};
}

inline void check_phantom(int64_t steps, double tau) {
    TORCH_CHECK_VALUE(steps >= 1, "idl: phantom_steps must be >= 1, got ", steps);
    TORCH_CHECK_VALUE(tau > 0.0 && tau <= 1.0, "idl: phantom_tau must be in (0, 1], got ", tau);
}

// The tensors of every adjoint (the solve and the phantom steps): A square,
// Z (m x n) and G of Z's shape, on A's device and dtype.
inline void check_adjoint_tensors(const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G) {
    check_square_with(A, Z, "Z");
    check_same(G, Z, "G", "Z");
    TORCH_CHECK_VALUE(G.sizes() == Z.sizes(), "idl: G must have shape ", Z.sizes(), ", got ",
                      G.sizes());
}

// idl::phantom_adjoint's arguments (every device); returns the activation.
inline idl_act check_phantom_args(const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G,
                                  c10::string_view activation, double slope, int64_t steps,
                                  double tau) {
    check_adjoint_tensors(A, Z, G);
    check_phantom(steps, tau);
    return parse_activation(activation, slope);
}

inline SolveArgs check_adjoint_args(const at::Tensor& A, const at::Tensor& Z, const at::Tensor& G,
                                    c10::string_view activation, double slope, int64_t max_iter,
                                    double tol, c10::string_view method, int64_t memory,
                                    double rtol = 0.0) {
    check_adjoint_tensors(A, Z, G);
    return SolveArgs{parse_activation(activation, slope),
                     parse_solver(method, max_iter, tol, memory, "max_iter", "tol", rtol)};
}

}  // namespace idl_checks

#endif  // IDL_CHECKS_H
