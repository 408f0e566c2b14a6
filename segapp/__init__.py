"""segapp: personalized reasoning segmentation (an LLM reads, SAM segments)."""

__version__ = "0.1.0"
