"""Distillation: regularising the outputs against an earlier model."""

__all__: list = []
