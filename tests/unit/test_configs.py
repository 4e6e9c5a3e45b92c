"""Every shipped YAML config parses (LightningCLI / jsonargparse validate class paths and argument names).

As litgpt's config-hub test: a renamed argument or a typo in a config fails here, not in a user's run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xrec_pl.cli import main
from xrec_pl.tools.stage_cli import XrecCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGE1 = sorted((CONFIGS / "stage1").glob("*.yaml"))
STAGE2 = sorted((CONFIGS / "stage2").glob("*.yaml"))
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))
DELTAS = sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "logger").glob("*.yaml"))
STAGE1_ABLATIONS = [p for p in ABLATIONS if p.stem.startswith("lightgcn")]
STAGE2_ABLATIONS = [p for p in ABLATIONS if not p.stem.startswith("lightgcn")]


def _print_config(*configs: Path, extra: tuple[str, ...] = ()) -> None:
    args = ["fit"]
    for config in configs:
        args += ["-c", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)


def test_there_are_configs():
    assert STAGE1 and STAGE2 and ABLATIONS and DELTAS


@pytest.mark.parametrize("config", STAGE1 + STAGE2, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_config_parses(config, capsys):
    _print_config(config)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("delta", DELTAS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_trainer_and_logger_deltas_parse(delta):
    _print_config(CONFIGS / "stage1" / "synthetic.yaml", delta)


@pytest.mark.parametrize("delta", STAGE2_ABLATIONS, ids=lambda p: p.name)
def test_stage2_ablation_deltas_parse(delta):
    _print_config(CONFIGS / "stage2" / "synthetic.yaml", delta)


@pytest.mark.parametrize("delta", STAGE1_ABLATIONS, ids=lambda p: p.name)
def test_stage1_ablation_deltas_parse(delta):
    _print_config(CONFIGS / "stage1" / "synthetic.yaml", delta)


@pytest.mark.parametrize("config", STAGE1, ids=lambda p: p.name)
def test_stage1_config_instantiates(config, synthetic_dir, tmp_path):
    cli = XrecCLI(
        args=["-c", str(config), f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert type(cli.model).__name__ == "LightGCNModule"
    assert cli.trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("config", STAGE2, ids=lambda p: p.name)
def test_stage2_config_instantiates_on_tiny_llm(config, synthetic_dir, tmp_path):
    cli = XrecCLI(
        args=[
            "-c",
            str(config),
            "--model.llm=tiny-random",
            "--model.llm_dtype=float32",
            "--model.embedding_source=random",
            "--model.embeddings_path=null",
            f"--data.data_dir={synthetic_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.strategy=auto",
            "--trainer.devices=1",
        ],
        run=False,
    )
    assert type(cli.model).__name__ == "ExplainerModule"


@pytest.mark.parametrize(
    "config",
    sorted((CONFIGS / "pipeline").glob("*.yaml")) + sorted((CONFIGS / "experiments").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_tool_configs_parse(config):
    command = "pipeline" if config.parent.name == "pipeline" else "experiment"
    if command == "experiment":
        from xrec_pl.tools.suite import load_suite

        assert load_suite(str(config)).arms  # arm names and reference arm are valid
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)


def _callbacks(config: Path) -> list[dict]:
    import yaml

    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    return [cb for cb in trainer.get("callbacks") or [] if isinstance(cb, dict)]


@pytest.mark.parametrize("config", STAGE1 + STAGE2, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_monitored_checkpoints_are_taken_at_validation(config):
    """A ``ModelCheckpoint`` that ranks by a validation metric must save when that metric is fresh.

    Saved every N steps instead, it scores weights by the value the previous validation logged (Lightning keeps it in
    ``callback_metrics``): from the second epoch on, the "best" checkpoint that test and predict load can be weights
    from the middle of an epoch, and the weights at a validation are never ranked. Resumption saves (``last.ckpt``)
    belong to ``PeriodicCheckpoint``.
    """
    for cb in _callbacks(config):
        if not str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            continue
        args = cb.get("init_args") or {}
        if args.get("monitor"):
            stale = [k for k in ("every_n_train_steps", "train_time_interval") if args.get(k)]
            assert not stale, (
                f"{config.name}: monitored checkpoint saved by {stale}, ranked by a stale {args['monitor']}"
            )
