"""Hub access: offline by default, `--online` turns it on for the process, the missing-model error says how."""

from __future__ import annotations

import os

import huggingface_hub.constants as hub_constants
import pytest

from xrec_pl.cli import main
from xrec_pl.errors import LLMLoadError
from xrec_pl.models.llm import load_frozen_llm

VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def hub_env(monkeypatch):
    """Start without either variable; restore the environment and huggingface_hub's constant afterwards."""
    for name in VARS:
        monkeypatch.setenv(name, "x")  # registers the restore
        monkeypatch.delenv(name)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)


def _state() -> tuple[str, str, bool]:
    return os.environ["HF_HUB_OFFLINE"], os.environ["TRANSFORMERS_OFFLINE"], hub_constants.HF_HUB_OFFLINE


COMMAND = ["hardware", "--models", "[smollm2-135m]"]


def test_offline_by_default(hub_env, capsys):
    hub_constants.HF_HUB_OFFLINE = False  # as huggingface_hub was imported before the CLI set the variable
    assert main(COMMAND) == 0
    assert _state() == ("1", "1", True)


@pytest.mark.parametrize("where", [0, 1, len(COMMAND)])
def test_online_flag_anywhere(hub_env, capsys, where):
    argv = COMMAND[:where] + ["--online"] + COMMAND[where:]
    assert main(argv) == 0
    assert _state() == ("0", "0", False)
    assert "smollm2-135m" in capsys.readouterr().out  # the flag was removed before the command parsed its options


def test_environment_choice_is_kept(hub_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert main(COMMAND) == 0
    assert _state() == ("0", "0", False)


def test_missing_model_error_says_how_to_download(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMLoadError) as info:
        load_frozen_llm("no-such-org/no-such-model")
    message = str(info.value)
    assert (
        "--online" in message and "HF_HUB_OFFLINE=0" in message and "hf download no-such-org/no-such-model" in message
    )


def test_missing_local_folder_gets_no_download_hint(hub_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model").mkdir()
    with pytest.raises(LLMLoadError) as info:
        load_frozen_llm(str(tmp_path / "model"))
    assert "--online" not in str(info.value)
