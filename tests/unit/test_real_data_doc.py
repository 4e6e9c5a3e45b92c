"""Every xrec-pl command of docs/REAL_DATA.md and the README's "Real data and real models" parses (--print_config)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from xrec_pl.cli import main

ROOT = Path(__file__).resolve().parents[2]
PARSED = ("fit", "predict", "pipeline", "evaluate", "hardware", "convert", "prepare-data")


def _commands(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    if path.name == "README.md":
        text = text.split("## Real data and real models", 1)[1].split("\n## ", 1)[0]
    found = []
    variables: dict[str, str] = {}  # shell variables carry over from block to block, as in one shell session
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and "=" in words[0]:
                name, value = words[0].split("=", 1)
                variables[name] = value
            elif words and words[0] == "xrec-pl":
                found.append([re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], w) for w in words[1:]])
    return found


COMMANDS = [cmd for doc in (ROOT / "docs/REAL_DATA.md", ROOT / "README.md") for cmd in _commands(doc)]


def test_the_docs_have_the_commands():
    kinds = {next(w for w in cmd if not w.startswith("-")) for cmd in COMMANDS}
    assert {"fit", "predict", "pipeline", "evaluate", "hardware", "prepare-data"} <= kinds
    assert sum("--online" in cmd for cmd in COMMANDS) >= 8
    assert any("configs/stage2/llama3_8b.yaml" in cmd for cmd in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv)[:90])
def test_command_parses(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # relative configs/... as in a clone (the shipped files serve them otherwise)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    command = next(w for w in argv if not w.startswith("-"))
    assert command in PARSED
    if command == "convert":
        argv = argv + ["--help"]  # it would read the data; the parse of its options is what is checked
    elif command != "hardware":  # hardware runs (a second, nothing downloaded)
        argv = argv + ["--print_config"]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code in (0, None), capsys.readouterr().err
