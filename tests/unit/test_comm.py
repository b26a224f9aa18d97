"""Rank bits: a flag summed over any number of ranks still names who raised it."""

from __future__ import annotations

import pytest
import torch

from dist_bregman import comm


def _summed(flagged: list[int], world: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """The int64 all-reduce of every rank's :func:`comm.rank_bit`, done here as a sum (the
    world size stays patched for the decode)."""
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: world)
    total = torch.zeros((), dtype=torch.int64)
    for rank in range(world) if world <= 4096 else flagged:  # unflagged ranks add 0
        monkeypatch.setattr(comm, "get_rank", lambda group=None, rank=rank: rank)
        total = total + comm.rank_bit(torch.tensor(rank in flagged))
    return int(total)


@pytest.mark.parametrize("world", [1, 2, 57, 58, 66, 128, 4096, 100_000])
def test_every_flagged_rank_is_reported_without_overflow(
    world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = comm.named_ranks(world)
    # The first and last named ranks, and, beyond them, runs of 4 (four shared 2**62 bits
    # once summed to 2**64 = 0) and every rank at once.
    for flagged in ({0, named - 1}, set(range(named, min(named + 4, world))), set(range(world))):
        if world > 4096 and len(flagged) == world:
            flagged = set(range(named)) | set(range(world - 5, world))
        decoded = comm.ranks_from_bits(_summed(sorted(flagged), world, monkeypatch))
        others = len([r for r in flagged if r >= named])
        expected: list[int | str] = sorted(r for r in flagged if r < named)
        if others:
            expected.append(f"{others} of ranks {named}-{world - 1}")
        assert decoded == expected


def test_ranks_62_to_65_of_66_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The case a shared top bit lost: four ranks' ``2**62`` summed to ``2**64``, 0 in int64."""
    named = comm.named_ranks(66)
    bits = _summed([62, 63, 64, 65], 66, monkeypatch)
    assert comm.ranks_from_bits(bits) == [f"4 of ranks {named}-65"]
