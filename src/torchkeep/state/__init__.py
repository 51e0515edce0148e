"""Turning model state into plain tensors and names, and back."""
