"""leaplm: fast and faithful LLM text generation on one CPU or GPU machine.

``from leaplm import LLM, SamplingParams`` — imported lazily so submodules (and the CLI's
``--help``) load without pulling in torch-heavy code they do not need.
"""
from .errors import LeapLMError

__all__ = ["LLM", "SamplingParams", "RequestOutput", "LeapLMError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from . import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'leaplm' has no attribute {name!r}")
