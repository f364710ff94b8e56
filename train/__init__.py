"""forgetrt.train: the PyTorch side."""
