"""The shipped configs, addressable without a clone: ``-c xrec:stage2/synthetic`` (or ``xrec:stage2/synthetic.yaml``).

The repository's ``configs/`` folder is installed inside the wheel as the package data ``xrec_pl/configs``. A config
is looked up as given first; a ``xrec:NAME`` is looked up only among the shipped configs; a relative path that does
not exist in the working folder (``configs/stage1/synthetic.yaml``, the defaults of ``pipeline`` and
``experiment``) falls back to the shipped file of that name, so documented commands work from any folder.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "xrec:"
_PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"  # installed from a wheel (package data)
_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # a clone (editable install)


def configs_dir() -> Path | None:
    """The folder of the shipped configs: the installed package data, else the clone's ``configs/``."""
    for root in (_PACKAGE_CONFIGS, _REPO_CONFIGS):
        if root.is_dir() and any(root.glob("*/*.yaml")):
            return root
    return None


def shipped_configs() -> list[str]:
    """Every shipped config as its short name (``stage2/synthetic``), sorted."""
    root = configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")) if root else []


def resolve_config(path: str | Path) -> Path:
    """The config file ``path`` names (see the module docstring for the lookup order).

    Raises:
        ConfigError: no such file, naming where it was looked for (and the shipped names for ``xrec:``).
    """
    from xrec_pl.errors import ConfigError

    text = str(path)
    root = configs_dir()
    if text.startswith(PREFIX):
        name = text[len(PREFIX) :].strip("/")
        candidate = root / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml") if root else None
        if candidate is not None and candidate.is_file() and root in candidate.resolve().parents:
            return candidate
        known = ", ".join(shipped_configs()[:60]) or "none (the package data is missing)"
        raise ConfigError(f"{text}: no such shipped config; known: {known}")
    given = Path(text).expanduser()
    if given.is_file():
        return given
    if root is not None and not given.is_absolute():
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        candidate = root.joinpath(*parts) if parts else None
        if candidate is not None and candidate.is_file():
            return candidate
    where = f"the working folder and the shipped configs ({root})" if root else "the working folder"
    raise ConfigError(f"{text}: config file not found (looked in {where})")


def expand_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``-c``/``--config`` value that is a ``xrec:`` name replaced by its file path."""
    out: list[str] = []
    expect = False
    for arg in argv:
        if expect and arg.startswith(PREFIX):
            arg = str(resolve_config(arg))
        elif arg.startswith(("--config=", "-c=")) and arg.split("=", 1)[1].startswith(PREFIX):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={resolve_config(value)}"
        expect = arg in ("-c", "--config")
        out.append(arg)
    return out
