"""Reading scorer weights: strict key and shape checks, lazy safetensors reading, fingerprints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffalign.scorers.weights import LazyTensor, ScorerWeightsError, fingerprint, load_exact, read_state_dict


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_a_lazy_state_dict_reads_only_headers_and_loads_like_the_eager_one(tmp_path):
    source = _model()
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    lazy = read_state_dict(file, lazy=True)
    assert all(isinstance(v, LazyTensor) for v in lazy.values()) and lazy["0.weight"].shape == (3, 4)
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    load_exact(target, lazy, str(file))
    for k, v in source.state_dict().items():
        assert target.state_dict()[k].dtype == torch.bfloat16  # cast to the module's dtype
        torch.testing.assert_close(target.state_dict()[k].float(), v, atol=1e-2, rtol=1e-2)
    broken = {**lazy, "0.weight": LazyTensor(lazy["0.weight"].file, "0.weight", torch.Size((4, 4)))}
    with pytest.raises(ScorerWeightsError, match=r"wrong shape: 0.weight: file \(4, 4\), model \(3, 4\)"):
        load_exact(target, broken, "x")


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    sd = _model().state_dict()
    with pytest.raises(ScorerWeightsError, match="missing: 1.bias; unexpected: 2.weight"):
        load_exact(_model(), {**{k: v for k, v in sd.items() if k != "1.bias"}, "2.weight": torch.zeros(1)}, "f.pt")
    load_exact(_model(), {k: v for k, v in sd.items() if k != "1.bias"}, "f.pt", ignore=("1.bias",))  # optional key
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    assert set(read_state_dict(tmp_path / "w.pt")) == set(sd)  # {'state_dict': ...} unwrapped
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ScorerWeightsError, match="expected a state dict of tensors, found list"):
        read_state_dict(tmp_path / "list.pt")


def test_fingerprint_follows_the_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    first = fingerprint(tmp_path / "a.bin")
    assert fingerprint(tmp_path / "a.bin") == first
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    assert fingerprint(tmp_path / "a.bin") != first
