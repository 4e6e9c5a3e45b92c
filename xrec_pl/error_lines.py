"""Turn whatever stopped a command into the one line the CLI prints (``xrec-pl: error: ...``, exit 2).

Three sources of bad input reach the CLI:

* the project's own ``DataError`` / ``ConfigError`` / ``LLMLoadError`` (their message names the file or option);
  jsonargparse may wrap them while it instantiates a class, so the exception chain is searched;
* jsonargparse parse errors (an unknown option, a value of the wrong type, a choice that is not allowed): their
  multi-line reports are condensed to ``--key: reason``;
* a config file that is empty, not YAML, or not a mapping, found before parsing so the message can name it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
)


def causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception it was raised from or during, outermost first (cycle-safe)."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]


def find_cause(err: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in ``err``'s chain, or None."""
    return next((e for e in causes(err) if isinstance(e, types)), None)


def condense_parse_error(message: str) -> str:
    """A jsonargparse error report as ``--key: reason`` on one line."""
    text = message.strip()
    if text.startswith("Unexpected config"):
        return "the config is empty or not a mapping of options"
    keys = re.findall(r'Parser key "([^"]+)"', text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = []
    for line in lines:
        line = re.sub(r'^Parser key "[^"]+":\s*', "", line).lstrip("- ").strip()
        if line and not any(noise in line for noise in _NOISE):
            reasons.append(line)
    specific = [r for r in reasons if not r.startswith("Problem with given class_path")] or reasons
    reason = (specific[0] if specific else "invalid value").rstrip(":")
    given = re.search(r"^\s*Given value: (.*)$", text, re.M)
    if given and "Got value" not in reason and not given.group(1).startswith("NestedArg"):
        reason += f" (got {given.group(1).strip()[:80]})"
    if not keys:
        return reason
    parts: list[str] = []
    for key in keys:  # "model" then "dim" -> model.dim; "trainer.max_epochs" stays as it is
        if parts and key.startswith(parts[-1] + "."):
            parts[-1] = key
        elif key not in parts:
            parts.append(key)
    return f"--{'.'.join(parts)}: {reason}"


def config_file_problem(argv: list[str]) -> str | None:
    """What is wrong with a ``-c``/``--config`` file of ``argv`` (missing, empty, not YAML, not a mapping), or None."""
    try:
        _check_config_files(argv)
    except ValueError as err:
        return str(err)
    return None


def _check_config_files(argv: list[str]) -> None:
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag not in ("-c", "--config") or value.lstrip().startswith("{"):
            continue
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: config file is not UTF-8 text") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where} ({problem})") from None
        if data is None:
            raise ValueError(f"{path}: config file is empty")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: config file must be a mapping of options, got {type(data).__name__}")


def constructor_error(err: BaseException, roots: tuple[str, ...]) -> str | None:
    """``Class: message`` for a ValueError/TypeError raised by a constructor in the project's code, else None.

    A constructor's own argument check (``batch_size must be positive``), or a check method of the project that the
    constructor called, is bad input; the same exception raised anywhere else (or inside third-party code) is a bug
    and keeps its traceback.
    """
    for exc in causes(err):
        if not isinstance(exc, (ValueError, TypeError)) or exc.__traceback__ is None:
            continue
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        # from the raising frame outwards, through the project's own code only: a constructor, or a check it called
        for frame in reversed(frames):
            if not any(part in roots for part in Path(frame.f_code.co_filename).parts[-3:-1]):
                break
            if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
                return f"{type(frame.f_locals['self']).__name__}: {exc}"
    return None
