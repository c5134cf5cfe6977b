"""The calibration/validation split of a search's tokens (issue 24, item 6)."""

from __future__ import annotations

import pytest
import torch

from qenv.errors import QenvError
from qenv.eval.tokens import TokenSet, split_tokens


def numbered(n_seq: int, seq_len: int = 4) -> TokenSet:
    return TokenSet(torch.arange(n_seq * seq_len).view(n_seq, seq_len), "text:x[0:32]")


def test_split_is_disjoint_whole_sequences_and_seeded():
    tokens = numbered(8)
    fit, val = split_tokens(tokens, 0.25, seed=0)
    assert fit.ids.shape == (6, 4) and val.ids.shape == (2, 4)
    rows = {tuple(r.tolist()) for r in tokens.ids}
    fit_rows, val_rows = {tuple(r.tolist()) for r in fit.ids}, {tuple(r.tolist()) for r in val.ids}
    assert fit_rows | val_rows == rows and not fit_rows & val_rows  # every sequence on exactly one side, whole
    again = split_tokens(tokens, 0.25, seed=0)
    assert torch.equal(again[1].ids, val.ids)  # the same seed gives the same split
    others = {tuple(map(tuple, split_tokens(tokens, 0.25, seed=s)[1].ids.tolist())) for s in range(6)}
    assert len(others) > 1  # seeds choose different validation sequences
    assert "validation 2/8" in val.source and "fit 6/8" in fit.source


def test_split_keeps_a_sequence_on_each_side():
    fit, val = split_tokens(numbered(2), 0.9)
    assert fit.ids.shape[0] == 1 and val.ids.shape[0] == 1
    with pytest.raises(QenvError, match="too few"):
        split_tokens(numbered(1))
    with pytest.raises(QenvError, match="between 0 and 1"):
        split_tokens(numbered(4), 1.0)
