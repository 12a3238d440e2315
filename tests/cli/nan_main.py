"""Test wrapper around ``python -m latentr3_fast.train`` that makes the SFT loss NaN from the
(K+1)-th training micro-batch on (K = env LATENTR3_TEST_NAN_AFTER): the CLI must stop with the
step number and keep the last good checkpoint. Validation calls (no grad) stay finite."""

from __future__ import annotations

import os
import sys

import torch

from latentr3_fast.train import sft
from latentr3_fast.train.__main__ import main

_real_loss = sft.sft_loss
_after = int(os.environ["LATENTR3_TEST_NAN_AFTER"])
_calls = 0


def _nan_after_k(model, batch, num_tokens=None):
    global _calls
    loss, nll = _real_loss(model, batch, num_tokens)
    if torch.is_grad_enabled():
        _calls += 1
        if _calls > _after:
            return loss * float("nan"), nll * float("nan")
    return loss, nll


sft.sft_loss = _nan_after_k

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
