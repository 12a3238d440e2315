"""Full-test-set evaluation with exact ranking: wall time and bounded memory (issue #9).

    python bench/bench_eval_full.py [--rows N] [--threads 1] [--hidden 128] [--vocab 1024]
    python bench/bench_eval_full.py --compare-methods 32   # tree attention vs frontier copies

* Data: CDs_and_Vinyl from ../shared/data (the paper's set; 6,157 test rows, 5,841 items).
* Model: the CLI's tiny backbone for real data (Qwen2 shape, 1 layer, hidden 128, BPE
  vocabulary 1024 trained on the catalogue, num_latent 1), random weights unless
  ``--checkpoint`` names a saved reasoner: time and memory do not depend on the weights.
* ``evaluate(rank="exact")``: every item of the catalogue is scored for every test row
  (tree attention over the trie, ``max_rows`` bounding one forward).
* A sampler thread reads the process RSS every 0.2 s; the result reports the peak, the RSS
  when 10 % of the rows were done, and the growth after that (bounded memory = no growth
  with the number of rows). Written to ``bench/results/bench_eval_full_cpu.json`` (the schema
  of ``bench/harness.py``).
* ``--compare-methods N``: ``exact_rank`` on the first N rows with ``method="tree"`` (one
  forward per chunk of trie nodes on the shared prompt cache) vs ``method="frontier"`` (the
  prompt cache copied per frontier node), same ranking required; prints the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

SHARED = HERE.parents[1] / "shared" / "data" / "CDs_and_Vinyl"


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    return harness.rss_bytes("VmRSS") / harness.MIB


class RssSampler(threading.Thread):
    """Samples (seconds since start, RSS MiB) until stopped."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_mb()))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def compare_methods(model, ds, args) -> dict:
    """Tree attention vs frontier cache copies on the same prompts: equal rankings, speed."""
    from latentr3_fast.data import collate
    from latentr3_fast.decode import catalogue_trie, exact_rank
    from latentr3_fast.decode.recommend import default_prompt_builder

    model.eval()
    pb = default_prompt_builder(model, ds.category)
    trie = catalogue_trie(ds.items, pb)
    enc = pb.encode_many(list(ds.split("test"))[: args.compare_methods])
    times: dict[str, float] = {}
    ranked = {}
    for method in ("tree", "frontier"):

        def rank_all(method=method):
            states, scores = [], []
            for a in range(0, len(enc), args.batch):
                batch = collate(enc[a : a + args.batch], model.tokenizer.pad_token_id)
                res = exact_rank(model, batch.prompt_ids, batch.prompt_mask, trie, method=method)
                states.append(res.states)
                scores.append(res.scores)
            return torch.cat(states), torch.cat(scores)

        timing = harness.time_call(rank_all, reps=1, warmup=0)
        times[method], ranked[method] = timing.min_s, timing.result
    same = bool(torch.equal(ranked["tree"][0][:, :100], ranked["frontier"][0][:, :100]))
    diff = float((ranked["tree"][1] - ranked["frontier"][1]).abs().max())
    result = {
        "rows": len(enc),
        "threads": args.threads,
        "s_per_row_tree": round(times["tree"] / len(enc), 3),
        "s_per_row_frontier": round(times["frontier"] / len(enc), 3),
        "speedup": round(times["frontier"] / times["tree"], 2),
        "same_top100": same,
        "max_score_diff": diff,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out) if args.out else HERE / "results" / "bench_exact_methods_cpu.json"
    harness.write_results(out, "bench_exact_methods", [result], config=vars(args))
    print(f"wrote {out}")
    return result


def build_model(args, ds):
    """The saved reasoner of ``--checkpoint``, else the CLI's tiny random-weight backbone."""
    from latentr3_fast.data import dataset_corpus, train_tokenizer
    from latentr3_fast.model import LatentReasoner, tiny_qwen2

    if args.checkpoint:
        return LatentReasoner.from_pretrained(args.checkpoint)
    tok = train_tokenizer(dataset_corpus(ds, "reference"), args.vocab)
    shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2)
    return tiny_qwen2(tok, **shape, intermediate=2 * args.hidden, seed=0, num_latent=1)


def main(argv: list[str] | None = None) -> dict:
    from latentr3_fast.data import load_dataset
    from latentr3_fast.eval import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--rows", type=int, default=None, help="first N test rows (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="prompts per evaluation batch")
    ap.add_argument("--length-penalty", type=float, default=0.0)
    ap.add_argument("--checkpoint", default=None, help="a saved LatentReasoner directory")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--compare-methods", type=int, default=0, metavar="N")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: not a directory")

    sampler = RssSampler()
    sampler.start()
    ds = load_dataset(args.data)
    model = build_model(args, ds)
    if args.compare_methods:
        return compare_methods(model, ds, args)
    rows = len(ds.split("test")) if args.rows is None else min(args.rows, len(ds.split("test")))
    rss_before = rss_mb()
    t_start = time.perf_counter() - sampler.t0

    def run():
        return evaluate(model, ds, rank="exact", length_penalty=args.length_penalty,
                        max_samples=rows, batch_size=args.batch)  # fmt: skip

    timing = harness.time_call(run, reps=1, warmup=0)
    res, wall = timing.result, timing.min_s
    sampler.stop()
    during = [(t - t_start, m) for t, m in sampler.samples if t >= t_start]
    early = [m for t, m in during if t <= 0.1 * wall] or [rss_before]
    late = [m for t, m in during if t > 0.1 * wall] or early
    result = {
        "data": str(args.data),
        "rows": rows,
        "items": len(ds.items.titles),
        "model": {
            "hidden": model.hidden_size,
            "layers": args.layers,
            "vocab": int(model.lm_head_weight.shape[0]),
            "checkpoint": args.checkpoint,
        },
        "threads": args.threads,
        "batch": args.batch,
        "wall_s": round(wall, 1),
        "s_per_row": round(wall / rows, 4),
        "rss_before_eval_mb": round(rss_before, 1),
        "rss_peak_first_10pct_mb": round(max(early), 1),
        "rss_peak_mb": round(max(m for _, m in sampler.samples), 1),
        "rss_growth_after_10pct_mb": round(max(late) - max(early), 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "NDCG@10": res.metrics["NDCG@10"],
        "HR@10": res.metrics["HR@10"],
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out) if args.out else HERE / "results" / "bench_eval_full_cpu.json"
    harness.write_results(out, "bench_eval_full", [result], config=vars(args))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
