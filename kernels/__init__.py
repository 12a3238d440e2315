"""Triton kernels, installed as latentr3_fast.kernels."""
