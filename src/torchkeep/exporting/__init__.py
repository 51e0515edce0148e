"""Export for deployment (ONNX, torch.export, TorchScript), verified against eager mode."""
