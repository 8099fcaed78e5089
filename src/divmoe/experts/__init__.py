"""Expert layouts."""

from .swiglu import StackedSwiGLU

__all__ = ["StackedSwiGLU"]
