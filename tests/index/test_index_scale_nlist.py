"""IVF list count at scale: the cap grows past 65,536 above 100M vectors (issue 15)."""

from index.faiss_index import nlist_for


def test_nlist_grows_past_65536_for_large_collections():
    assert nlist_for(100_000_000) == 32_768
    sizes = [10**8 + 1, 2 * 10**8, 4 * 10**8, 10**9, 5 * 10**9]
    got = [nlist_for(n) for n in sizes]
    assert got == sorted(got) and got[0] == 65_536 and got[-2] == 1 << 18 == got[-1]
