"""sdgrpo: self-distillation GRPO for unlabeled text."""

__version__ = "0.1.0"
