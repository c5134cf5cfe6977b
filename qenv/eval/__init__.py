"""Fidelity measurement: token sets, the full-precision reference, and the evaluator."""
