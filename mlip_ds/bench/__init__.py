"""Helpers shared by tests and benchmarks/ (not used in training)."""
