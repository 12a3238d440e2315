"""evaluate(): metrics agree with the per-row predictions; beam vs exact; JSONL output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from latentr3_fast.data import PromptBuilder
from latentr3_fast.decode import catalogue_trie
from latentr3_fast.errors import ConfigError
from latentr3_fast.eval import (
    evaluate,
    first_hit_rank,
    metrics_from_ranks,
    popularity_groups,
)


def short_pb(model, ds):
    return PromptBuilder(model.tokenizer, ds.category, num_latent=1, max_length=90)


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_beam_evaluate_metrics_match_predictions(tiny_eval, tmp_path, lp):
    ds, model = tiny_eval
    model.train()
    path = tmp_path / "pred.jsonl"
    res = evaluate(
        model,
        ds,
        "test",
        num_beams=4,
        length_penalty=lp,
        max_samples=9,
        batch_size=4,
        prompt_builder=short_pb(model, ds),
        predictions_path=path,
        progress=False,
    )
    assert model.training  # mode restored
    m, rows = res.metrics, res.predictions
    assert m["n"] == 9 and [r["row"] for r in rows] == list(range(9))
    titles = ds.items.titles
    for r, s in zip(rows, ds.test[:9]):
        assert r["target_id"] == s.target_id and r["target_title"] == s.target_title
        assert 1 <= len(r["pred_titles"]) <= 4
        assert r["rank"] == first_hit_rank(r["pred_titles"], s.target_title)
        assert all(
            titles[i] == t for ids, t in zip(r["pred_item_ids"], r["pred_titles"]) for i in ids
        )
        assert r["scores"] == sorted(r["scores"], reverse=True)
    want = metrics_from_ranks([r["rank"] for r in rows], ks=(1, 3))
    for key, v in want.items():
        assert m[key] == pytest.approx(v)
    # K beyond the 4 returned beams cannot be reached: listed, and not reported as metrics
    assert m["ks_beyond_returned"] == [5, 10, 20]
    for k in (5, 10, 20):
        assert f"HR@{k}" not in m and f"NDCG@{k}" not in m
        assert f"HR@{k}" not in m["groups"]["popular"]
    assert m["out_of_catalogue"] == 0
    pop = popularity_groups(ds.popularity)
    n_pop = sum(bool(pop[r["target_id"]]) for r in rows)
    assert m["groups"]["popular"]["n"] == n_pop and m["groups"]["unpopular"]["n"] == 9 - n_pop
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))


def test_exact_evaluate_ranks_whole_catalogue(tiny_eval):
    ds, model = tiny_eval
    pb = short_pb(model, ds)
    ex = evaluate(
        model,
        ds,
        "valid",
        rank="exact",
        max_samples=6,
        batch_size=3,
        prompt_builder=pb,
        progress=False,
    )
    beam = evaluate(
        model,
        ds,
        "valid",
        num_beams=3,
        max_samples=6,
        batch_size=3,
        prompt_builder=pb,
        progress=False,
    )
    assert ex.metrics["ks_beyond_returned"] == []
    n_titles = len(set(ds.items.titles))
    for r_ex, r_b in zip(ex.predictions, beam.predictions):
        assert len(r_ex["pred_titles"]) == min(20, n_titles)
        # the exact list starts with a score at least the beam's best
        assert r_ex["scores"][0] >= r_b["scores"][0] - 1e-5
    # beam search with enough beams finds the exact top-1 on this tiny catalogue
    beam_all = evaluate(
        model,
        ds,
        "valid",
        num_beams=40,
        max_samples=6,
        batch_size=3,
        prompt_builder=pb,
        progress=False,
    )
    for r_ex, r_b in zip(ex.predictions, beam_all.predictions):
        assert r_ex["pred_titles"][:5] == r_b["pred_titles"][:5]
        np.testing.assert_allclose(r_ex["scores"][:5], r_b["scores"][:5], rtol=1e-6, atol=1e-5)


def test_exact_ranking_reports_no_k_beyond_the_catalogue(tiny_eval):
    """Exact ranking lists the whole catalogue: a K above its number of distinct titles
    cannot be reached and is not reported (it would repeat the largest reachable K)."""
    ds, model = tiny_eval
    n_titles = len(set(ds.items.titles))
    ks = (1, 5, n_titles, n_titles + 1, 10 * n_titles)
    res = evaluate(
        model,
        ds,
        "valid",
        rank="exact",
        max_samples=4,
        batch_size=4,
        ks=ks,
        prompt_builder=short_pb(model, ds),
        progress=False,
    )
    m = res.metrics
    assert m["num_returned"] == n_titles
    assert m["ks_beyond_returned"] == [n_titles + 1, 10 * n_titles]
    assert f"HR@{n_titles}" in m and f"HR@{n_titles + 1}" not in m
    assert m[f"HR@{n_titles}"] == 1.0  # every target is somewhere in the whole catalogue
    want = metrics_from_ranks([r["rank"] for r in res.predictions], ks=ks[:3])
    assert {k: m[k] for k in want} == pytest.approx(want)


def test_trie_is_cached_per_catalogue(tiny_eval):
    ds, model = tiny_eval
    pb = short_pb(model, ds)
    assert catalogue_trie(ds.items, pb) is catalogue_trie(ds.items, pb)


def test_evaluate_bad_arguments(tiny_eval):
    ds, model = tiny_eval
    with pytest.raises(ConfigError, match="rank"):
        evaluate(model, ds, rank="greedy", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(model, ds, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="split"):
        evaluate(model, ds, split="dev", progress=False)


def test_empty_split_gives_zero_metrics_not_nan(tiny_eval):
    ds, model = tiny_eval
    res = evaluate(model, ds, max_samples=0, progress=False)
    assert res.metrics["n"] == 0 and res.metrics["HR@10"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in res.metrics.values())


@pytest.mark.parametrize("rank", ["exact", "beam"])
def test_evaluate_scorings_equals_one_evaluate_per_penalty(tiny_eval, tmp_path, rank):
    """One pass under [0.0, 1.0] (exact: the catalogue is scored once) gives exactly what two
    separate evaluate() calls give: metrics, predictions and the written JSON lines."""
    from latentr3_fast.eval import evaluate_scorings

    ds, model = tiny_eval
    kw = dict(
        rank=rank,
        num_beams=4,
        max_samples=9,
        batch_size=4,
        prompt_builder=short_pb(model, ds),
        progress=False,
    )
    paths = [tmp_path / "d3.jsonl", tmp_path / "bigrec.jsonl"]
    both = evaluate_scorings(model, ds, [0.0, 1.0], predictions_paths=paths, **kw)
    for lp, got, path in zip([0.0, 1.0], both, paths):
        ref = evaluate(model, ds, length_penalty=lp, predictions_path=tmp_path / "ref.jsonl", **kw)
        assert got.metrics == ref.metrics
        assert got.predictions == ref.predictions
        assert path.read_text() == (tmp_path / "ref.jsonl").read_text()
    if rank == "exact":  # the two scorings really rank differently somewhere
        assert both[0].predictions != both[1].predictions
    with pytest.raises(ConfigError, match="predictions_paths"):
        evaluate_scorings(model, ds, [0.0, 1.0], predictions_paths=paths[:1], **kw)


@pytest.mark.parametrize("flag", [None, "exact"])
def test_cli_beam_stop_reaches_the_beam_search(tiny_eval, tmp_path, monkeypatch, flag):
    """``--beam-stop`` (default: reference) is parsed, validated and handed by the pipeline's
    evaluation to every beam search it runs."""
    import importlib

    from latentr3_fast.train.config import load_config
    from latentr3_fast.train.pipeline import evaluate_models

    ds, model = tiny_eval
    argv = ["--num-beams", "3", "--length-penalty", "1.0", "--max-eval-samples", "2"]
    cfg, _ = load_config(argv + ([] if flag is None else ["--beam-stop", flag]))
    assert cfg.beam_stop == (flag or "reference")
    rec = importlib.import_module("latentr3_fast.decode.recommend")  # the module, not the fn
    seen = []
    real = rec.beam_search

    def spy(*args, **kwargs):
        seen.append(kwargs["stop_rule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "beam_search", spy)
    records = evaluate_models(cfg, ds, {"sft": model}, tmp_path)
    assert seen and set(seen) == {flag or "reference"}
    assert records[0]["ks_beyond_returned"] == [5, 10, 20] and "HR@20" not in records[0]


def test_cli_rejects_an_unknown_beam_stop():
    from latentr3_fast.train.config import load_config

    with pytest.raises(ConfigError, match="--beam-stop: 'never' is not one of reference, exact"):
        load_config(["--beam-stop", "never"])[0].validate()
