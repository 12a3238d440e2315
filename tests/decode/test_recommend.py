"""recommend(): raw titles or item ids in, top-k catalogue items out."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.data import Sample, collate
from latentr3_fast.decode import beam_search, catalogue_trie, recommend
from latentr3_fast.errors import ConfigError, DataError


def test_recommend_titles_and_ids_agree_with_beam_search(tiny_setup):
    ds, m, pb = tiny_setup["ds"], tiny_setup["model"], tiny_setup["pb"]
    samples = ds.test[:3]
    by_title = recommend(m, [s.history_titles for s in samples], k=4, catalog=ds, prompt_builder=pb)
    by_id = recommend(
        m,
        [list(s.history_ids) for s in samples],
        k=4,
        catalog=ds.items,
        category=ds.category,
        prompt_builder=pb,
        batch_size=2,
    )
    assert by_title == by_id
    trie = catalogue_trie(ds.items, pb)
    enc = [pb.encode(Sample((), s.history_titles, 0, "")) for s in samples]
    batch = collate(enc, tiny_setup["tok"].pad_token_id)
    ref = beam_search(m, batch.prompt_ids, batch.prompt_mask, trie, num_beams=10, num_return=4)
    for u, recs in enumerate(by_title):
        assert len(recs) == 4
        assert [r["item_ids"] for r in recs] == ref.item_ids[u]
        assert [r["score"] for r in recs] == pytest.approx(ref.scores[u].tolist())
        assert all(ds.items.titles[i] == r["title"] for r in recs for i in r["item_ids"])


def test_recommend_exact_and_default_builder(tiny_setup):
    ds, m = tiny_setup["ds"], tiny_setup["model"]
    hist = [ds.test[0].history_titles]
    recs = recommend(m, hist, k=3, catalog=ds, rank="exact", prompt_builder=tiny_setup["pb"])[0]
    assert len(recs) == 3 and recs[0]["score"] >= recs[1]["score"] >= recs[2]["score"]
    # default PromptBuilder from the dataset's category (full-length prompt)
    recs2 = recommend(m, hist, k=2, catalog=ds, num_beams=3)[0]
    assert len(recs2) == 2


def test_recommend_bad_input(tiny_setup):
    ds, m = tiny_setup["ds"], tiny_setup["model"]
    with pytest.raises(DataError, match=r"histories\[1\]"):
        recommend(m, [[0], [10**6]], catalog=ds, prompt_builder=tiny_setup["pb"])
    with pytest.raises(ConfigError, match="category"):
        recommend(m, [[0]], catalog=ds.items)
    with pytest.raises(ConfigError, match="k="):
        recommend(m, [[0]], k=0, catalog=ds)
    with pytest.raises(ConfigError, match="rank"):
        recommend(m, [[0]], catalog=ds, rank="sample", prompt_builder=tiny_setup["pb"])
    assert torch.get_num_threads() == 1


def test_recommend_numpy_ids_recbole_tokens_and_exclude_seen(tiny_setup):
    """numpy integers and source-data tokens (RecBole item_id) name the same items as titles;
    a catalogue with tokens maps predictions back to them; exclude_seen drops exactly the
    history's titles from the unfiltered ranking."""
    import numpy as np

    from latentr3_fast.data import ItemCatalog

    ds, m, pb = tiny_setup["ds"], tiny_setup["model"], tiny_setup["pb"]
    cat = ItemCatalog(ds.items.titles, tokens=[f"rb{i * 7}" for i in range(len(ds.items))])
    samples = ds.test[:3]
    kw = dict(k=4, catalog=cat, category=ds.category, prompt_builder=pb)
    by_title = recommend(m, [s.history_titles for s in samples], **kw)
    by_np = recommend(m, [np.asarray(s.history_ids, dtype=np.int64) for s in samples], **kw)
    by_token = recommend(m, [[f"rb{i * 7}" for i in s.history_ids] for s in samples], **kw)
    assert by_title == by_np == by_token
    for recs in by_title:
        assert len(recs) == 4
        for r in recs:
            assert r["item_tokens"] == [f"rb{i * 7}" for i in r["item_ids"]]
    with pytest.raises(DataError, match=r"histories\[0\]: item id 99999"):
        recommend(m, [[np.int32(99999)]], **kw)
    with pytest.raises(DataError, match=r"histories\[0\]: 1.5 \(float\)"):
        recommend(m, [[1.5]], **kw)

    # histories that end with the model's own top pick: the filter has something to drop
    first = recommend(m, [s.history_titles for s in samples], k=1, catalog=ds, prompt_builder=pb)
    hist = [s.history_titles[-5:] + (f[0]["title"],) for s, f in zip(samples, first)]
    want = 4 + max(len(h) for h in hist)
    beams = max(want, 10)
    full = recommend(m, hist, k=want, num_beams=beams, catalog=ds, prompt_builder=pb)
    unseen = recommend(m, hist, k=4, catalog=ds, prompt_builder=pb, exclude_seen=True)
    for h, f, u in zip(hist, full, unseen):
        expected = [r for r in f if r["title"] not in set(h)][:4]
        assert u == expected
        assert not {r["title"] for r in u} & set(h)
    assert any(u != f[:4] for f, u in zip(full, unseen))  # the filter changed something
