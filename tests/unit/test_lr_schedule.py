"""The stage-2 learning-rate schedule: warmup, constant, linear decay over the last steps (warmup-stable-decay)."""

from __future__ import annotations

import random

import pytest
import torch

from xrec_pl.lit.optim import adam_with_warmup, lr_factor, schedules_agree


def test_factor_warms_up_holds_then_decays_to_one_over_decay_steps():
    factors = [lr_factor(s, warmup_steps=2, decay_steps=4, total_steps=10) for s in range(10)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])
    assert [lr_factor(s) for s in range(3)] == [1.0, 1.0, 1.0]  # no schedule: constant
    assert lr_factor(9, 0, 10, 10) == pytest.approx(0.1)  # decay over the whole run
    assert lr_factor(0, 4, 2, 2) == pytest.approx(0.25)  # overlapping ramps multiply
    with pytest.raises(ValueError, match="total number"):
        lr_factor(0, 0, 3, None)


def test_schedules_agree_exactly_while_the_decay_has_not_started():
    constant = {"warmup_steps": 2, "decay_steps": 0}
    cooldown = {"warmup_steps": 2, "decay_steps": 4, "total_steps": 10}  # decays from step 6 on
    assert schedules_agree(constant, cooldown, 7)  # steps 0..6 train at the same rates (factor 1 at step 6)
    assert not schedules_agree(constant, cooldown, 8)
    assert not schedules_agree(constant, {"warmup_steps": 3}, 1)
    assert schedules_agree(cooldown, dict(cooldown), 10**6)  # identical: no step-by-step walk
    # a huge step count (a tampered checkpoint) costs no more than the schedules' own length
    assert not schedules_agree(constant, cooldown, 10**15)
    assert schedules_agree(constant, {"warmup_steps": 2, "decay_steps": 0, "total_steps": 10**15}, 10**15)


def test_the_corner_rule_equals_a_step_by_step_walk():
    """``schedules_agree`` checks three steps per stretch between corners; on small random schedules it must say
    exactly what comparing every step says."""
    rng = random.Random(0)

    def draw():
        decay = rng.choice([0, 0, rng.randint(1, 12)])
        return {
            "warmup_steps": rng.choice([0, rng.randint(1, 8)]),
            "decay_steps": decay,
            "total_steps": rng.randint(decay, 30) if decay else None,
        }

    def walk(a, b, n):
        ka, kb = (tuple(s.values()) for s in (a, b))
        return all(lr_factor(step, *ka) == lr_factor(step, *kb) for step in range(n))

    cases = [(draw(), draw(), rng.randint(0, 35)) for _ in range(3000)]
    assert sum(walk(*c) for c in cases) > 300  # both answers occur
    assert all(schedules_agree(*c) == walk(*c) for c in cases)


def test_optimizer_follows_the_schedule_and_refuses_a_decay_longer_than_the_run():
    w = torch.nn.Parameter(torch.zeros(2))
    conf = adam_with_warmup([w], "adamw", 1e-2, 0.0, warmup_steps=0, decay_steps=3, total_steps=5)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2, 1e-2, 1e-2, 2e-2 / 3, 1e-2 / 3])
    # the schedule is a plain function: the scheduler's state_dict holds none of its settings, so a resume
    # with another (compatible) decay is not overwritten by the stored one
    assert sched.state_dict()["lr_lambdas"] == [None]
    assert isinstance(adam_with_warmup([w], "adam", 1e-3, 0.0), torch.optim.Adam)  # no schedule: the bare optimizer
    with pytest.raises(ValueError, match=r"decay_steps \(6\) must be at most the run's optimizer steps \(5\)"):
        adam_with_warmup([w], "adamw", 1e-2, 0.0, decay_steps=6, total_steps=5)


def test_a_tampered_schedule_in_a_checkpoint_is_one_data_error(tmp_path):
    """What a checkpoint says about its schedule is checked before it is used (one line naming the file)."""
    from tests.fixtures.data import random_embeddings_file
    from xrec_pl.errors import DataError
    from xrec_pl.lit.explainer import ExplainerModule

    module = ExplainerModule(llm="tiny-random", embeddings_path=random_embeddings_file(tmp_path, dim=64))
    good = {"state_dict": {k: v for k, v in module.state_dict().items() if "adapter" in k}, "global_step": 4}
    module.on_save_checkpoint(good)
    for bad in ({"lr_schedule": {"warmup_steps": "5"}}, {"lr_schedule": [1, 2]}, {"global_step": -1}):
        with pytest.raises(DataError, match="lr_schedule/global_step"):
            module.on_load_checkpoint({**good, **bad})
    module.on_load_checkpoint(good)  # the untampered checkpoint loads
