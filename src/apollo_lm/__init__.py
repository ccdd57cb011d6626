"""apollo-lm: train Transformer language models from scratch faster by growing them while they train."""

__version__ = "0.1.0"
