"""Whole models without pickle: architecture by config (or by torch's own stock layers) + weights."""
