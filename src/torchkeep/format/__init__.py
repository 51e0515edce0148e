"""Bytes <-> tensors: the safetensors layout torchkeep writes and reads, with hard limits."""
