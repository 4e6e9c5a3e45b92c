"""MoEAdapter / LinearAdapter / build_adapter."""

from __future__ import annotations

import pytest
import torch

from xrec_pl.models.adapters import LinearAdapter, MoEAdapter, build_adapter, count_parameters


@pytest.fixture
def moe() -> MoEAdapter:
    torch.manual_seed(0)
    return MoEAdapter(in_dim=16, out_dim=24, num_experts=4)


@pytest.mark.parametrize("lead", [(5,), (3, 2), ()])
def test_moe_shapes(moe: MoEAdapter, lead: tuple[int, ...]) -> None:
    x = torch.randn(*lead, 16)
    for training in (True, False):
        moe.train(training)
        y = moe(x)
        assert y.shape == (*lead, 24)
        assert y.dtype == torch.float32


def test_moe_init_values(moe: MoEAdapter) -> None:
    assert moe.expert_weight.shape == (4, 24, 16)
    assert moe.expert_bias.shape == (4, 16)
    assert torch.count_nonzero(moe.expert_bias) == 0
    assert torch.count_nonzero(moe.w_gate) == 0
    assert torch.count_nonzero(moe.w_noise) == 0
    std = moe.expert_weight.std().item()
    assert 0.015 < std < 0.025
    assert abs(moe.expert_weight.mean().item()) < 0.005
    # reset_parameters restores the init after training-like changes
    with torch.no_grad():
        moe.w_gate.fill_(1.0)
        moe.expert_bias.fill_(1.0)
    moe.reset_parameters()
    assert torch.count_nonzero(moe.w_gate) == 0 and torch.count_nonzero(moe.expert_bias) == 0


def test_moe_gate_uniform_at_init(moe: MoEAdapter) -> None:
    x = torch.randn(7, 16)
    moe.eval()
    torch.testing.assert_close(moe.gates(x), torch.full((7, 4), 0.25))
    # eval output at init = mean of the experts' outputs (no dropout, zero bias)
    expected = torch.einsum("bi,eoi->beo", x, moe.expert_weight).mean(1)
    torch.testing.assert_close(moe(x), expected)
    # in training the noisy gate is no longer uniform (noise std = softplus(0) + 0.01 > 0) but still sums to one
    moe.train()
    gates = moe.gates(x)
    assert not torch.allclose(gates, torch.full_like(gates, 0.25))
    torch.testing.assert_close(gates.sum(-1), torch.ones(7))


def test_moe_noise_std_formula() -> None:
    moe = MoEAdapter(4, 3, num_experts=2, dropout=0.0)
    with torch.no_grad():
        moe.w_noise.fill_(0.5)
    x = torch.ones(20000, 4)
    moe.train()
    torch.manual_seed(1)
    gates = moe.gates(x)  # logits = noise only; two experts: gate0 = sigmoid(n0 - n1)
    expected_std = torch.nn.functional.softplus(torch.tensor(2.0)) + 0.01
    logit_diff = torch.log(gates[:, 0] / gates[:, 1])
    assert abs(logit_diff.std().item() - expected_std.item() * 2**0.5) < 0.05


def test_moe_eval_is_deterministic(moe: MoEAdapter) -> None:
    with torch.no_grad():
        moe.w_noise.normal_()
        moe.w_gate.normal_()
    moe.eval()
    x = torch.randn(6, 16)
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)
    moe.train()
    assert not torch.equal(moe(x), moe(x))  # dropout + noise


def test_moe_no_noisy_gating_in_training() -> None:
    moe = MoEAdapter(8, 8, dropout=0.0, noisy_gating=False).train()
    x = torch.randn(3, 8)
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)


def test_moe_gradients_reach_every_parameter(moe: MoEAdapter) -> None:
    with torch.no_grad():
        moe.w_noise.normal_(std=0.1)
    moe.train()
    x = torch.randn(9, 16)
    moe(x).pow(2).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_moe_fp32_for_low_precision_input(moe: MoEAdapter) -> None:
    moe.eval()
    x = torch.randn(2, 16)
    y = moe(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    # a bf16 copy of the module still computes in fp32
    assert moe.to(torch.bfloat16)(x).dtype == torch.float32


def test_moe_rejects_bad_input(moe: MoEAdapter) -> None:
    with pytest.raises(ValueError, match="last dim 16"):
        moe(torch.randn(2, 15))
    with pytest.raises(ValueError):
        MoEAdapter(0, 4)
    with pytest.raises(ValueError):
        MoEAdapter(4, 4, dropout=1.0)


def test_linear_adapter() -> None:
    torch.manual_seed(0)
    lin = LinearAdapter(64, 32)
    assert torch.count_nonzero(lin.bias) == 0
    assert 0.015 < lin.weight.std().item() < 0.025
    x = torch.randn(4, 64, dtype=torch.float64)
    y = lin(x)
    assert y.shape == (4, 32) and y.dtype == torch.float32
    y.sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None


def test_build_adapter() -> None:
    moe = build_adapter("moe", 64, 576)
    assert isinstance(moe, MoEAdapter) and moe.num_experts == 8 and moe.dropout == 0.2 and moe.noisy_gating
    assert count_parameters(moe) == 8 * 64 * 576 + 8 * 64 + 2 * 64 * 8
    assert isinstance(build_adapter("MoE", 4, 4, num_experts=2), MoEAdapter)
    assert isinstance(build_adapter("linear", 64, 576), LinearAdapter)
    assert build_adapter("none", 64, 576) is None
    assert count_parameters(None) == 0
    with pytest.raises(ValueError, match="unknown adapter 'mlp'"):
        build_adapter("mlp", 4, 4)
    with pytest.raises(ValueError, match="takes no options"):
        build_adapter("linear", 4, 4, num_experts=3)
