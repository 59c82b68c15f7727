"""Model backends other than plain transformers + PEFT. Each is imported only when chosen."""
