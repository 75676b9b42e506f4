"""Fake kernels, autograd registration and backend dispatch of the custom ops."""
