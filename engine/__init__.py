"""gpt2-memengine: memory-optimized fine-tuning of GPT-2 up to gpt2-xl."""

__version__ = "0.1.0"
