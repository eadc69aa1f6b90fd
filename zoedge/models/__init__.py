"""Models zoedge provides out of the box (the default SmolLM2-135M-Instruct)."""
from __future__ import annotations

from zoedge.models.default import default_cache_root, default_model_dir, find_gguf_file

__all__ = ["default_cache_root", "default_model_dir", "find_gguf_file"]
