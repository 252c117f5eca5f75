"""The bucket plan of a round (qsr_ds/sync/layout.py): which tensors go in place, how the rest are cut
into pieces and packed, and the ramp that keeps the first pack and the last unpack short."""
import torch

from qsr_ds.sync.layout import plan_buckets

MIB = 2**20 // 4  # fp32 elements per MiB


def _covered(named, in_place, buckets):
    """Every element of every tensor exactly once, in order: in place whole, or as bucket pieces."""
    seen = {id(t): 0 for t in in_place}
    for bucket in buckets:
        assert bucket.offsets == [sum(s.numel() for s in bucket.sources[:i]) for i in range(len(bucket.sources))]
        assert bucket.numel == sum(s.numel() for s in bucket.sources)
    pieces = [s for b in buckets for s in b.sources]
    for _, t in named:
        if any(t is p for p in in_place):
            continue
        mine = [p for p in pieces if p.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()]
        starts = [p.storage_offset() for p in mine]
        assert starts == sorted(starts) and sum(p.numel() for p in mine) == t.numel()
        seen[id(t)] = len(mine)
    return seen


def test_ramp_up_and_down_over_a_gpt_sized_round():
    named = [(f"w{i}", torch.zeros(250_000, dtype=torch.bfloat16)) for i in range(100)]  # 25M, all packed
    bucket = 64 * MIB
    in_place, buckets = plan_buckets(named, {}, bucket)
    _covered(named, in_place, buckets)
    sizes = [b.numel for b in buckets]
    assert in_place == [] and sum(sizes) == 25_000_000
    lead = bucket // 16  # 4 MiB of fp32
    assert sizes[0] <= lead and sizes[-1] <= lead, sizes  # what nothing overlaps is small
    assert max(sizes) <= bucket
    peak = sizes.index(max(sizes))
    assert sizes[: peak + 1] == sorted(sizes[: peak + 1])  # up, then down
    assert sizes[peak:] == sorted(sizes[peak:], reverse=True)
    assert len(buckets) <= 12  # 4, 8, 16, 32 MiB, then halving what is left


def test_in_place_rule_and_copies():
    big = torch.zeros(40 * MIB)  # fp32, contiguous, at least half of a 64 MiB bucket: in place
    with_copy = torch.zeros(40 * MIB)  # the same with a bf16 model copy: packed (the copy needs writing)
    small = torch.zeros(1000)
    half = torch.zeros(1000, dtype=torch.float16)
    named = [("big", big), ("with_copy", with_copy), ("small", small), ("half", half)]
    copies = {"with_copy": torch.zeros(40 * MIB, dtype=torch.bfloat16)}
    in_place, buckets = plan_buckets(named, copies, 64 * MIB)
    assert len(in_place) == 1 and in_place[0] is big
    _covered(named, in_place, buckets)
    for b in buckets:  # dtypes never share a bucket; copies travel with their pieces
        kinds = {s.dtype for s in b.sources}
        assert len(kinds) == 1
        assert all((c is None) == (kinds == {torch.float16} or s.numel() == 1000) for s, c in zip(b.sources, b.copies))
    pieces = [(s, c) for b in buckets for s, c in zip(b.sources, b.copies) if c is not None]
    assert sum(s.numel() for s, _ in pieces) == 40 * MIB
    assert all(c.numel() == s.numel() and c.dtype == torch.bfloat16 for s, c in pieces)


def test_small_buckets_keep_pieces_of_64k_elements():
    named = [("a", torch.zeros(300_000, dtype=torch.bfloat16)), ("b", torch.zeros(7, dtype=torch.bfloat16))]
    in_place, buckets = plan_buckets(named, {}, MIB)  # 1 MiB buckets: a lead of 64 KiB, pieces of 256 KiB
    _covered(named, in_place, buckets)
    pieces = [s.numel() for b in buckets for s in b.sources]
    assert pieces == [65536] * 4 + [300_000 - 4 * 65536, 7]
    assert len(buckets) == 6  # a piece larger than a bucket's share fills one alone


def test_buckets_below_64k_elements_cut_at_the_bucket_size():
    named = [("a", torch.zeros(3000, dtype=torch.bfloat16)), ("b", torch.zeros(7, dtype=torch.bfloat16))]
    in_place, buckets = plan_buckets(named, {}, 1000)
    _covered(named, in_place, buckets)
    assert [b.numel for b in buckets] == [1000, 1000, 1000, 7]
