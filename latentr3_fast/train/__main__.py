"""``python -m latentr3_fast.train``: the whole LatentR3 pipeline (see ``--help``)."""

from __future__ import annotations

import sys

import torch

torch.set_flush_denormal(True)  # first torch call: denormals slow tiny-model CPU training ~4x


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input, 3 training failure)."""
    from ..errors import LatentR3Error, TrainingError
    from .config import apply_embedded_defaults, load_config
    from .interrupt import TrainingInterrupted, install_handlers
    from .pipeline import run

    _quiet_hf()
    install_handlers()  # Ctrl-C / SIGTERM during training: finish the step, checkpoint, stop
    cfg = None
    try:
        cfg, given = load_config(argv)  # argparse exits with code 2 on unknown flags
        cfg = apply_embedded_defaults(cfg, given)
        cfg.validate()
        run(cfg)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except LatentR3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\ninterrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        where = f" in {cfg.output_dir}" if cfg is not None else ""
        print(
            f"\ninterrupted: finished stages and checkpoints written so far are kept{where} "
            "(--resume continues)",
            file=sys.stderr,
        )
        return 130
    return 0


def _quiet_hf() -> None:
    """Hide Hugging Face's per-save/load progress bars (our own bars show progress)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
