"""The real backbone: dense decoding retrieves a buried passkey; all-SA with a small window cannot."""

from __future__ import annotations

import torch

from flux.attention.patterns import StreamingPattern
from flux.model import FluxModel
from flux.passkey import passkey_prompt


def test_smollm2_shape_and_frozen(smollm2):
    assert smollm2.num_layers == 30 and smollm2.num_heads == 9 and smollm2.num_kv_heads == 3
    assert smollm2.max_positions == 8192
    assert all(not p.requires_grad for p in smollm2.model.parameters())


def test_passkey_dense_finds_it_sparse_does_not(smollm2):
    ids = passkey_prompt(smollm2.tokenizer, passkey="68213", filler_tokens=1500, depth=0.2)
    ids = torch.tensor([ids])
    assert 1400 <= ids.shape[1] <= 1800
    fm = FluxModel(smollm2, pattern=StreamingPattern(sink=16, window=128))
    dense = fm.generate(ids, plan="dense", max_new_tokens=12)
    sparse = fm.generate(ids, plan="sparse", max_new_tokens=12)
    decode = smollm2.tokenizer.decode
    assert "68213" in decode(dense.sequences[0])
    assert "68213" not in decode(sparse.sequences[0])
    assert sparse.kv_bytes < 0.15 * sparse.kv_bytes_dense
    assert dense.kv_bytes == dense.kv_bytes_dense


def test_passkey_prompt_refuses_settings_it_cannot_honour(tokenizer):
    import pytest

    from flux.errors import ConfigError

    with pytest.raises(ConfigError, match=r"filler_tokens=-5 is less than one filler passage \(\d+ tokens\)"):
        passkey_prompt(tokenizer, filler_tokens=-5)
    with pytest.raises(ConfigError, match=r"filler_tokens=3 is less than one filler passage"):
        passkey_prompt(tokenizer, filler_tokens=3)
    with pytest.raises(ConfigError, match=r"depth=1.5 must lie in \[0, 1\]"):
        passkey_prompt(tokenizer, depth=1.5)
