"""The ``xrec-pl`` command line.

Two families of commands share one entry point:

* ``fit``, ``validate``, ``test``, ``predict``: LightningCLI over any of the project's LightningModules and
  DataModules, chosen by ``class_path`` in the YAML config (``xrec-pl fit -c configs/stage1/synthetic.yaml``).
* tools: ``pipeline``, ``evaluate``, ``make-synthetic``, ``prepare-data``, ``convert``, ``bench``, ``experiment``,
  ``analyze`` (jsonargparse functions; each takes ``--config`` too).

Bad input (``DataError``, ``ConfigError``) ends the program with one line on stderr and exit code 2.

Model hubs are offline by default (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` unless the environment sets
them); ``--online`` anywhere on the command line turns both off for this process, so a missing model is downloaded.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from xrec_pl.data.convert import RecordFormat
from xrec_pl.data.synthetic import SyntheticSize
from xrec_pl.error_lines import condense_parse_error, config_file_problem, constructor_error, find_cause
from xrec_pl.errors import CLI_ERRORS, ConfigError
from xrec_pl.tools.stage_cli import XrecCLI, offline_defaults

STAGE_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = (
    "pipeline",
    "evaluate",
    "make-synthetic",
    "prepare-data",
    "convert",
    "bench",
    "experiment",
    "analyze",
    "hardware",
    "init",
    "baselines",
    "export",
)


# ----------------------------------------------------------------------------------------------------- tool commands


def make_synthetic(
    out: str = "data/synthetic",
    seed: int = 0,
    size: SyntheticSize = "default",
    overwrite: bool = False,
) -> str:
    """Write the project's deterministic synthetic dataset in the XRec format.

    Args:
        out: Output folder.
        seed: Random seed; the same seed gives byte-identical files.
        size: ``tiny`` (tests), ``default`` (first runs) or ``smoke`` (default with 240 test records).
        overwrite: Replace an existing dataset folder.
    """
    from xrec_pl.data.synthetic import make_synthetic as _make
    from xrec_pl.outputs import check_output_dir

    target = check_output_dir(out, "--out")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target}: folder exists and is not empty; pass --overwrite true to replace it")
    return str(_make(target, seed=seed, size=size))


def convert(src: str, dst: str, format: RecordFormat = "parquet", overwrite: bool = False) -> list[str]:
    """Convert an XRec data folder's pickles to a plain format once, so later reads never unpickle.

    Args:
        src: XRec data folder (``para_dict.pickle``, ``total_*.csv``, ``{trn,val,tst}.pkl``).
        dst: Output folder.
        format: ``parquet`` or ``jsonl`` for the text records.
        overwrite: Replace existing files in ``dst``.
    """
    from xrec_pl.data.convert import convert_folder

    written = [str(p) for p in convert_folder(src, dst, fmt=format, overwrite=overwrite)]
    if not written:
        raise ConfigError(f"{src}: no XRec files (para_dict.pickle, total_*.csv, *.pkl) to convert")
    sys.stdout.write("\n".join(written) + "\n")
    return written


def evaluate(
    predictions: str,
    references: str | None = None,
    metrics: list[str] | None = None,
    output: str | None = None,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    rescale_with_baseline: bool = False,
    bleurt_checkpoint: str | None = None,
    bartscore_checkpoint: str | None = None,
    judge_model: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    records: str | None = None,
    judge_prompt: str = "default",
    against: str | None = None,
    against_references: str | None = None,
    specificity: bool = False,
) -> dict:
    """Score a prediction file against its references and print one JSON object.

    Args:
        predictions: Our predict JSONL (``prediction``/``reference`` fields) or a pickled list of strings.
        references: Reference file (JSONL or pickled list); defaults to the ``reference`` field of ``predictions``.
        metrics: Any of ``usr``, ``bertscore``, ``bleurt``, ``bartscore``, ``llm_judge`` (default: usr, bertscore).
        output: Also write the JSON here.
        bertscore_model: BERTScore backbone (local path or cached hub name); default: the offline MiniLM, layer 6.
        bertscore_layers: Layer of the backbone to use (default: the backbone's usual layer).
        rescale_with_baseline: BERTScore baseline rescaling (needs the backbone's baseline file, e.g. roberta-large).
        bleurt_checkpoint: Path of a BLEURT checkpoint (needed for ``bleurt``).
        bartscore_checkpoint: Path of a BART checkpoint (needed for ``bartscore``).
        judge_model: Local causal LM used as the judge (default: the embedded LLM).
        batch_size: Scoring batch size for every metric that batches.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        records: Score only the pairs whose reference belongs to this XRec split file (e.g. ``tst.pkl``), matched
            by reference text — how the reference's shuffled released predictions are paired with a split.
        judge_prompt: ``default`` or ``xrec`` (XRec's GPTScore system prompt and JSON message) for ``llm_judge``.
        against: Another system's predictions (JSONL or pickled list, any order): score both and test the paired
            difference (ours - theirs) per metric, pairing by reference text (e.g. XRec's released ``tst_pred.pkl``).
        against_references: References of ``against`` when they are not inside it (the release's ``tst_ref.pkl``).
        specificity: Also score each prediction against another record's reference (a seeded derangement) and
            test the paired difference: the record-specific part of each score (key ``specificity``).
    """
    import json

    from xrec_pl.tools.compare import compare_against
    from xrec_pl.tools.evaluate import evaluate_files

    chosen = [m.lower().replace("-", "_") for m in (metrics or ["usr", "bertscore"])]
    options: dict[str, Any] = {
        "bertscore_model_type": bertscore_model,
        "bertscore_num_layers": bertscore_layers,
        "bertscore_rescale_with_baseline": rescale_with_baseline or None,
        "bleurt_checkpoint": bleurt_checkpoint,
        "bartscore_checkpoint": bartscore_checkpoint,
        "llm_judge_judge_model": judge_model,
        "llm_judge_prompt_style": None if judge_prompt == "default" else judge_prompt,
        "device": device,
    }
    if batch_size is not None:
        options.update({f"{m}_batch_size": batch_size for m in chosen if m != "usr"})
    if specificity and against is not None:
        raise ConfigError("--specificity: not with --against (run it on each system's own file)")
    if specificity:
        result = _evaluate_with_specificity(predictions, references, chosen, output, records, options)
    elif against is not None:
        result = compare_against(
            predictions, against, references, against_references, chosen, output, records, **options
        )
    else:
        result = evaluate_files(predictions, references, metrics=chosen, output=output, records=records, **options)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _evaluate_with_specificity(
    predictions: str, references: str | None, metrics: list[str], output: str | None, records: str | None, options: dict
) -> dict:
    """``evaluate_files``' result plus ``specificity``, from one read of the files."""
    from xrec_pl.outputs import check_output_file
    from xrec_pl.tools.evaluate import check_metric_names, evaluate, load_pair, restrict_to_records
    from xrec_pl.tools.floors import specificity
    from xrec_pl.utils import dump_json

    check_metric_names(metrics)
    if output is not None:
        check_output_file(output, "--output", [predictions, references, records])
    preds, refs, sources = load_pair(predictions, references)
    if records is not None:
        preds, refs, dropped = restrict_to_records(preds, refs, records)
        sources = {**sources, "records": str(records), "pairs_outside_records": str(dropped)}
    result = evaluate(preds, refs, metrics, per_sample=True, sources=sources, **options)
    result["specificity"] = specificity(preds, refs, metrics, own=result.pop("per_sample"), **options)
    if output is not None:
        dump_json(output, result)
    return result


def init(dir: str) -> list[str]:
    """Write the shipped configs into ``DIR/configs/`` (the repository's layout), to read and edit.

    Inside ``DIR`` the documented commands (``-c configs/stage2/llama2_7b.yaml``) then use these copies. Existing
    files are never overwritten: if any target exists, nothing is written.

    Args:
        dir: Folder to write ``configs/`` into (created if missing).
    """
    from xrec_pl.config_files import configs_dir
    from xrec_pl.outputs import check_output_dir
    from xrec_pl.utils import atomic_write_text

    root = configs_dir()
    if root is None:
        raise ConfigError("this installation has no shipped configs (xrec_pl/configs is missing)")
    target = check_output_dir(dir, "DIR") / "configs"
    sources = sorted(root.rglob("*.yaml"))
    for source in sources:
        if (target / source.relative_to(root)).exists():
            raise ConfigError(
                f"{target / source.relative_to(root)}: exists; init never overwrites (choose another DIR)"
            )
    written = []
    for source in sources:
        path = target / source.relative_to(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(str(atomic_write_text(path, source.read_text(encoding="utf-8"))))
    sys.stdout.write(f"wrote {len(written)} configs into {target}\n")
    return written


def _tool_functions() -> dict[str, Any]:
    from xrec_pl.tools.analysis import analyze
    from xrec_pl.tools.bench import bench
    from xrec_pl.tools.experiment import experiment
    from xrec_pl.tools.export import export
    from xrec_pl.tools.floors import baselines
    from xrec_pl.tools.hardware import hardware
    from xrec_pl.tools.pipeline import pipeline
    from xrec_pl.tools.prepare_data import prepare_data

    return {
        "pipeline": pipeline,
        "evaluate": evaluate,
        "make-synthetic": make_synthetic,
        "prepare-data": prepare_data,
        "convert": convert,
        "bench": bench,
        "experiment": experiment,
        "analyze": analyze,
        "hardware": hardware,
        "init": init,
        "baselines": baselines,
        "export": export,
    }


USAGE = """usage: xrec-pl COMMAND [options]

Training (LightningCLI; pick the stage with a config):
  fit | validate | test | predict   -c configs/stage1/synthetic.yaml  (or configs/stage2/..., any overrides)

Tools:
  pipeline        stage 1 -> stage 2 -> predict -> score, into one run folder
  evaluate        score a prediction file (BERTScore, USR, BLEURT, BARTScore, LLM judge)
  make-synthetic  write the deterministic synthetic XRec-format dataset
  prepare-data    check a folder of XRec's release and write it complete (rebuilds the files it lacks)
  convert         convert an XRec folder's pickles to parquet/jsonl once
  bench           benchmarks against reference-style implementations
  experiment      run an ablation suite over seeds and write a report
  baselines       scores of explanations no model wrote (training medoid, same item / user), for scale
  analyze         embedding-swap test, soft-prompt analysis, outlier buckets of a trained stage-2 run
  export          a trained stage-2 run's adapters as safetensors + JSON (peft arms: peft's own layout)
  init DIR        write the shipped configs into DIR/configs to edit (never overwrites)
  hardware        computed GPU memory / host RAM table for Llama-2-7B, Llama-3-8B, SmolLM2 (no download)

`xrec-pl COMMAND --help` shows every option of a command. Hugging Face downloads are off unless `--online` is
given (anywhere on the line) or the environment sets HF_HUB_OFFLINE=0.
"""
ONLINE_FLAG = "--online"


def set_hub_offline(offline: bool) -> None:
    """Set HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE for this process, in the environment and in huggingface_hub.

    huggingface_hub reads the variable once, when it is imported (already done by the imports of this module), so
    its module constant is set as well.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1" if offline else "0"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = offline


def _env_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _error_line(err: BaseException) -> str | None:
    """The one line for bad input (ours, wrapped by jsonargparse, a parse error, a constructor check), else None."""
    from jsonargparse import ArgumentError

    ours = find_cause(err, CLI_ERRORS)
    if ours is not None:
        return " ".join(str(ours).split("\n"))
    if isinstance(err, ArgumentError):
        return condense_parse_error(str(err))
    return constructor_error(err, ("xrec_pl", "callbacks", "data_modules", "lit", "models", "data", "metrics"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xrec-pl`` console script."""
    offline_defaults()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    online = ONLINE_FLAG in argv
    argv = [arg for arg in argv if arg != ONLINE_FLAG]
    set_hub_offline(not online and _env_offline())
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    from xrec_pl.run_lock import release_all

    try:
        from xrec_pl.config_files import expand_config_args

        argv = expand_config_args(argv)  # -c xrec:stage2/synthetic -> the shipped file
        problem = config_file_problem(argv)
        if problem is not None:
            raise ConfigError(problem)
        if argv[0] in STAGE_COMMANDS:
            # from the shell LightningCLI reads sys.argv itself (passing both makes it warn)
            if from_command_line and argv != sys.argv[1:]:
                sys.argv[1:] = argv  # the expanded xrec: names (LightningCLI reads sys.argv itself)
            XrecCLI(args=None if from_command_line else argv)
        elif argv[0] in TOOL_COMMANDS:
            from jsonargparse import CLI

            # `-c` as in the stage commands (jsonargparse's function CLIs only know `--config`)
            argv = ["--config" if arg == "-c" else arg for arg in argv]
            if argv[0] == "init" and len(argv) > 1 and not argv[1].startswith("-"):
                argv = ["init", "--dir", *argv[1:]]  # `xrec-pl init DIR`
            CLI(_tool_functions(), args=argv, as_positional=False, prog="xrec-pl", exit_on_error=False)
        else:
            sys.stderr.write(f"xrec-pl: error: unknown command {argv[0]!r}\n\n{USAGE}")
            return 2
    except Exception as err:
        line = _error_line(err)
        if line is None:
            raise
        sys.stderr.write(f"xrec-pl: error: {line}\n")
        return 2
    except SystemExit as stop:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(stop, SIGTERMException):
            raise
        # Lightning stops a fit on SIGTERM by raising SIGTERMException() with no code, which would exit 0: a job that
        # `fit && predict` chains, or a scheduler, must see that the run did not finish.
        code = stop.code if isinstance(stop.code, int) and stop.code else 128 + int(signal.SIGTERM)
        sys.stderr.write(f"xrec-pl: stopped by a signal (exit {code}); continue with --ckpt_path last\n")
        return code
    finally:
        release_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
