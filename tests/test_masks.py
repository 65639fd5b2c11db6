import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap.pruning.masks import nm_mask, parse_nm, rowwise_mask


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 8), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8)]),
       seed=st.integers(0, 10_000))
def test_nm_mask_prunes_exactly_n_per_group(rows, groups, nm, seed):
    n, m = nm
    score = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(score, n, m)
    per_group = mask.reshape(rows, groups, m).sum(-1)
    assert (per_group == n).all()
    # the pruned entries are the lowest of their group
    g = score.reshape(rows, groups, m)
    pruned_max = torch.where(mask.reshape(rows, groups, m), g, torch.full_like(g, -1)).amax(-1)
    kept_min = torch.where(~mask.reshape(rows, groups, m), g, torch.full_like(g, 2)).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_mask_needs_divisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_rowwise_mask_counts():
    mask = rowwise_mask(torch.rand(5, 10), 0.6)
    assert (mask.sum(1) == 6).all()


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(None) is None
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError):
            parse_nm(bad)
