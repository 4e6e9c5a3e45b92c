"""A hub/local LLM loads straight onto its rank's device (device_map) on CUDA; on CPU nothing changes."""

from __future__ import annotations

import pytest
import torch

from xrec_pl.models import llm_loading
from xrec_pl.models.llm import load_frozen_llm
from xrec_pl.models.tiny import build_tiny_llm


@pytest.fixture
def saved_tiny(tmp_path):
    model, tokenizer = build_tiny_llm()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


@pytest.fixture
def calls(monkeypatch):
    """The extra from_pretrained arguments of every load (the real load still runs)."""
    seen = []
    real = llm_loading._from_pretrained

    def spy(path, torch_dtype, quant_kwargs, **kwargs):
        seen.append(dict(quant_kwargs))
        return real(path, torch_dtype, quant_kwargs, **kwargs)

    monkeypatch.setattr(llm_loading, "_from_pretrained", spy)
    return seen


def _cuda(monkeypatch, count: int, **env: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_rank_device_follows_the_local_rank(monkeypatch):
    _cuda(monkeypatch, 4)
    assert llm_loading.rank_device() == torch.device("cuda", 0)  # the launching process (rank 0)
    _cuda(monkeypatch, 4, LOCAL_RANK="3")
    assert llm_loading.rank_device() == torch.device("cuda", 3)
    _cuda(monkeypatch, 4, SLURM_LOCALID="2")
    assert llm_loading.rank_device() == torch.device("cuda", 2)
    _cuda(monkeypatch, 1, SLURM_LOCALID="5")  # a SLURM task that sees its own GPU only
    assert llm_loading.rank_device() == torch.device("cuda", 0)
    _cuda(monkeypatch, 2, LOCAL_RANK="1", SLURM_LOCALID="0")  # torchrun's variable wins
    assert llm_loading.rank_device() == torch.device("cuda", 1)


def test_cpu_load_is_unchanged(saved_tiny, calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = saved_tiny
    model, _ = load_frozen_llm(str(path), dtype="float32")
    assert calls == [{}]  # no device_map: built in host RAM as before
    assert model.device.type == "cpu"


def test_device_map_load_gives_the_same_model(saved_tiny, calls, monkeypatch):
    """The device_map path, run on CPU (the device CUDA would put there): same weights, in the requested dtype."""
    path, original = saved_tiny
    monkeypatch.setattr(llm_loading, "rank_device", lambda: torch.device("cpu"))
    placed, _ = load_frozen_llm(str(path), dtype="bfloat16")
    assert calls == [{"device_map": {"": torch.device("cpu")}}]
    assert {p.dtype for p in placed.parameters()} == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in placed.parameters())
    monkeypatch.setattr(llm_loading, "rank_device", lambda: None)
    plain, _ = load_frozen_llm(str(path), dtype="bfloat16")
    assert calls[-1] == {}
    for (name, a), b in zip(placed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(placed.state_dict()[layer], original.state_dict()[layer].to(torch.bfloat16))


def test_quantization_arguments_hold_no_device(monkeypatch):
    """The device comes from rank_device (not torch.cuda.current_device(), 0 on every rank at __init__ time)."""
    assert llm_loading.quantization_kwargs("none", torch.bfloat16) == {}
    assert llm_loading.placement_kwargs(torch.device("cuda", 2)) == {"device_map": {"": torch.device("cuda", 2)}}
    assert llm_loading.placement_kwargs(None) == {}
