"""labkit: inference optimization, measured honestly.

Quantization, pruning, distillation, ONNX/TensorRT export and paged LLM serving, on the same models,
with the same measurement core. Start with ``labkit doctor`` and ``notebooks/00_setup_and_baselines``.
"""

__version__ = "0.1.0"


class LabkitError(ValueError):
    """A user-facing error: the message names the parameter, the value and what is allowed.

    It is a ``ValueError`` (as torch's and vLLM's argument checks are), so a caller's ``except ValueError``
    catches a bad argument value.
    """
