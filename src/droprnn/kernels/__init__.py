"""Kernels that run cells over time. ``reference`` is the plain-PyTorch oracle every fast path equals."""
