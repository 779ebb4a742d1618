"""One owner of an open index's state (issue 15): saver and searcher share it, Index copies nothing."""

from __future__ import annotations

import numpy as np

from index import Index


def test_saver_and_searcher_share_one_state(tmp_path):
    index = Index.create(tmp_path / "ix", 8)
    assert index._saver.state is index._state and index._query.state is index._state
    assert set(vars(index)) == {"dir", "store", "vectors", "_state", "_saver", "_query"}
    x = np.eye(8, dtype=np.float32)[:3]
    ids = index.add(x, [{"path": f"/r/{i}.png"} for i in range(3)])
    # the unsaved vectors the write side appended are what the read side gathers and searches
    assert index._state.pending.n == 3
    np.testing.assert_array_equal(index.get_vectors(ids), x)
    assert index.search(x[1], 1)[0][0, 0] == ids[1]
    index.save()
    assert index._state.pending.n == 0 and index.generation == 1 and len(index) == 3
    np.testing.assert_array_equal(index.get_vectors(ids), x)  # now from the written segment
    index.close()
