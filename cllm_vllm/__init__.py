"""cllm-vllm: Jacobi parallel decoding of Consistency LLMs inside vLLM, and their training.

Importing this package does not import vLLM; serving code loads it lazily, and
``cllm_vllm.training`` works with torch and transformers alone.
"""

__version__ = "0.1.0"
