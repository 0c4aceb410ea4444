"""Evaluation commands: perplexity (`hack eval ppl`) and task accuracy (`hack eval accuracy`)."""
