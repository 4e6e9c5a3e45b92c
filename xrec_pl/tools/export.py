"""``xrec-pl export``: a trained stage-2 run's adapters as files others load without xrec-pl.

* Graph-conditioned runs (``ExplainerModule``): ``adapters.safetensors`` + ``xrec_adapters.json``
  (:mod:`xrec_pl.models.export`; load them back with :func:`~xrec_pl.models.export.load_exported`).
* peft arms (``lora``, ``prompt_tuning``): peft's own ``save_pretrained`` layout (``adapter_config.json``,
  ``adapter_model.safetensors``; ``peft.PeftModel.from_pretrained(base_llm, DIR)`` loads it) plus
  ``xrec_peft.json`` with the LLM's identity and the prompt settings.

The run's checkpoint is read weights-only and validated (LLM identity, arm, adapter keys and shapes) before
anything is written; the folder is written beside its final name and renamed at the end.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from xrec_pl.errors import DataError
from xrec_pl.utils import atomic_folder

__all__ = ["export"]

_PROMPT_KEYS = ("style", "domain", "profiles", "max_length", "chat_template")


def _provenance(run_dir: Path, checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    metrics_path = run_dir / "metrics.json"
    metrics = {}
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8")).get("metrics", {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            metrics = {}
    return {
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        "epoch": meta.get("epoch"),
        "global_step": meta.get("global_step"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def _prompt(dm_hp: dict[str, Any]) -> dict[str, Any]:
    return {k: dm_hp[k] for k in _PROMPT_KEYS if k in dm_hp}


def _export_peft(meta: dict[str, Any], checkpoint: Path, out: Path, provenance: dict[str, Any]) -> Path:
    from xrec_pl.lit.peft_explainer import PeftExplainerModule
    from xrec_pl.models.llm import get_llm_info

    hp = dict(meta.get("hyper_parameters") or {})
    accepted = set(inspect.signature(PeftExplainerModule.__init__).parameters) - {"self"}
    module = PeftExplainerModule(**{k: v for k, v in hp.items() if k in accepted})
    module.accept_checkpoint(meta, str(checkpoint))
    module.load_state_dict(meta["state_dict"], strict=False)
    with atomic_folder(out) as staging:
        module.llm.save_pretrained(str(staging))
        info = {
            "format": "xrec-pl-peft",
            "version": 1,
            "method": hp.get("method"),
            "llm": get_llm_info(module.llm.get_base_model()).to_dict(),
            "prompt": _prompt(dict(meta.get("datamodule_hyper_parameters") or {})),
            "trained": provenance,
        }
        (staging / "xrec_peft.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def export(
    run: str,
    out: str,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    embeddings_path: str | None = None,
) -> str:
    """Write a trained stage-2 run's adapters into ``OUT`` (a new or empty folder).

    Args:
        run: The stage-2 run folder (``trainer.default_root_dir`` of its fit, e.g. ``runs/amazon/stage2``).
        out: Folder to write (must not exist, or be empty).
        checkpoint: Checkpoint to export (default ``RUN/checkpoints/last.ckpt``).
        data_dir: The run's data folder when it has moved (sizes the random arm's tables).
        embeddings_path: The run's stage-1 embeddings when they have moved.
    """
    from xrec_pl.data.pickles import safe_torch_load
    from xrec_pl.models.export import SWITCHES, export_adapters
    from xrec_pl.outputs import check_output_dir
    from xrec_pl.tools.analysis.run import find_checkpoint, load_run

    run_dir = Path(run)
    target = check_output_dir(out, "--out", [run])
    if target.is_symlink():
        raise DataError(f"--out {target}: is a link; give a plain folder path")
    if target.exists() and any(target.iterdir()):
        raise DataError(f"--out {target}: exists and is not empty; export never overwrites")
    ckpt = find_checkpoint(run_dir, checkpoint)
    meta = safe_torch_load(ckpt, "checkpoint")
    if not isinstance(meta, dict):
        raise DataError(f"{ckpt}: not a Lightning checkpoint (a {type(meta).__name__})")
    hp = dict(meta.get("hyper_parameters") or {})
    provenance = _provenance(run_dir, ckpt, meta)
    if "method" in hp and "embedding_source" not in hp:
        written = _export_peft(meta, ckpt, target, provenance)
    else:
        loaded = load_run(run_dir, str(ckpt), data_dir=data_dir, embeddings_path=embeddings_path)
        module = loaded.module
        written = export_adapters(
            module.net,
            target,
            {key: module.hparams[key] for key in SWITCHES},
            extra_tokens=tuple(module.hparams.get("extra_tokens") or ()),
            prompt=_prompt(dict(loaded.datamodule.hparams)),
            trained=provenance,
        )
    sys.stdout.write(f"exported the adapters of {ckpt} into {written}\n")
    return str(written)
