"""A small, real paged-attention serving engine with a vLLM-shaped API.

``from labkit.serve import LLM, SamplingParams``. Modules, one concept each: ``config``, ``sampling``,
``sequence``, ``block_manager``, ``scheduler``, ``kv_cache``, ``model``, ``runner``, ``engine``, ``outputs``,
``llm``; around them ``detokenizer``, ``protocol`` and ``server`` (OpenAI-compatible HTTP), ``client`` (load
generator), ``baselines`` and ``bench`` (what the engine is measured against).
"""

from labkit.serve.config import EngineConfig
from labkit.serve.engine import LLMEngine
from labkit.serve.llm import LLM
from labkit.serve.outputs import EngineStats, RequestOutput
from labkit.serve.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
