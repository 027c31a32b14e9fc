"""hftlab: the harmful fine-tuning pipeline (align → attack → defend → evaluate → analyse)."""

__version__ = "0.1.0"
