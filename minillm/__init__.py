"""minillm: a Llama runtime in NumPy/CuPy built around LM-Infinite streaming."""

from .api import Model, load
from .errors import MiniLLMError, ModelFileError
from .session import Session

__all__ = ["load", "Model", "Session", "MiniLLMError", "ModelFileError"]
__version__ = "0.1.0"
