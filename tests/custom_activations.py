"""A user-defined activation for the tests: Python phi/dphi on top of
ImplicitFunctionInf (module level, so that pickle can find it)."""
import idl


class Softsign(idl.ImplicitFunctionInf):
    @staticmethod
    def phi(X):
        return X / (1 + X.abs())

    @staticmethod
    def dphi(X):
        return 1 / (1 + X.abs()) ** 2
