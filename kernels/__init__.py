"""Triton kernels and their launchers (imported as ``fastvlm.kernels``). Triton only: no autograd, no nn."""
