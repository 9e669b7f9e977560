"""Method registry: importing this package registers every method."""

from gem_bench.methods import adalora, adapter, bitfit, full, lora, masked  # noqa: F401  (registration)
from gem_bench.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
