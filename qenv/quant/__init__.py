"""Survival rules, the quantizer, exact size accounting, recipe application and presets."""
