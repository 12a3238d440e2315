"""Triton kernels, installed as ``latentr3_fast.kernels`` (never a top-level ``kernels``).

* ``linear_logprob``: fused LM head + online log-sum-exp + target gather, forward/backward;
  its launch configurations per GPU class and dtype are in ``logprob_configs``.
* ``gaussian_expand``: GRPO latent expansion with in-kernel Philox noise.
* ``_checks``: argument checks and ``interpreting()``, shared with ``latentr3_fast.ops`` (the
  kernels import nothing from the ops; the ops import these).

Import the submodules only when a kernel is needed (``latentr3_fast.ops`` does so lazily):
``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined.
"""
