"""Weights (state dicts): save, load, load_into, inspect."""
