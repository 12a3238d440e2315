"""Triton kernels, installed as ``latentr3_fast.kernels`` (never a top-level ``kernels``).

* ``linear_logprob``: fused LM head + online log-sum-exp + target gather, forward/backward.
* ``gaussian_expand``: GRPO latent expansion with in-kernel Philox noise.

Import the submodules only when a kernel is needed (``latentr3_fast.ops`` does so lazily):
``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined.
"""
