"""Exchange with other tools: Hugging Face ``transformers`` checkpoints in both directions."""

from .hf import export_run, import_hf, init_weights_from_hf

__all__ = ["export_run", "import_hf", "init_weights_from_hf"]
