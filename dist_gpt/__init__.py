"""dist_gpt: train GPT language models from scratch and finetune them."""

__version__ = "0.1.0"
