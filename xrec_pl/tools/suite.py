"""What an ablation suite is: the arms the framework knows (``ARMS``) and a suite file (``Suite``, ``load_suite``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xrec_pl.data.synthetic import SyntheticSize
from xrec_pl.errors import ConfigError

# The arms the framework knows: stage-2 and stage-1 delta files, and whether stage 2 trains.
ARMS: dict[str, dict[str, Any]] = {
    "xrec": {"doc": "full XRec: graph embeddings, MoE adapters, injection in every layer"},
    "no_moe": {"stage2": ["ablations/no_moe.yaml"], "doc": "single linear adapter instead of the MoE"},
    "no_adapter": {"stage2": ["ablations/no_adapter.yaml"], "doc": "no adapter: reserved tokens keep new embeddings"},
    "fixed_emb": {"stage2": ["ablations/fixed_emb.yaml"], "doc": "one constant embedding for all users/items"},
    "random_emb": {"stage2": ["ablations/random_emb.yaml"], "doc": "random embedding fixed per id"},
    "redrawn_emb": {"stage2": ["ablations/redrawn_emb.yaml"], "doc": "random embedding re-drawn every step"},
    "input_only": {
        "stage2": ["ablations/input_only.yaml"],
        "doc": 'injection at the input tokens only (the studies\' "without injection")',
    },
    "no_injection": {
        "stage2": ["ablations/no_injection.yaml"],
        "train": False,  # nothing reaches the LLM from the adapters, so there is nothing to train
        "doc": "no injection at all: adapters disconnected, nothing to train (the plain prompt)",
    },
    "no_profiles": {"stage2": ["ablations/no_profiles.yaml"], "doc": "title only, no user/item profiles"},
    "no_profiles_no_injection": {
        "stage2": ["ablations/no_profiles.yaml", "ablations/no_injection.yaml"],
        "doc": "no profiles and no injection",
    },
    "plain_llm": {
        "stage2": ["ablations/plain_llm.yaml"],
        "train": False,
        "doc": "the frozen LLM with the same prompt, no adapters, no training",
    },
    "lightgcn_mean": {"stage1": ["ablations/lightgcn_mean.yaml"], "doc": "LightGCN layers averaged, not summed"},
    "lora": {"stage2": ["ablations/lora.yaml"], "doc": "peft LoRA on the frozen LLM, same prompt, no graph"},
    "prompt_tuning": {
        "stage2": ["ablations/prompt_tuning.yaml"],
        "doc": "peft prompt tuning on the frozen LLM, same prompt, no graph",
    },
    # sweeps (issue 15): "xrec" is the 8-expert, 64-d point of both
    **{
        f"experts_{n}": {"stage2": [f"ablations/experts_{n}.yaml"], "doc": f"MoE adapters with {n} expert(s)"}
        for n in (1, 2, 4, 16)
    },
    **{
        f"dim_{d}": {
            "stage1": [f"ablations/lightgcn_dim_{d}.yaml"],
            "stage2": [f"ablations/graph_dim_{d}.yaml"],
            "doc": f"{d}-d LightGCN embeddings (own stage 1) read by the adapters",
        }
        for d in (32, 128)
    },
}


@dataclass
class Suite:
    """A parsed suite file."""

    name: str
    arms: list[str]
    out_dir: str
    stage1_config: str
    stage2_config: str
    data_dir: str | None = None
    synthetic_size: SyntheticSize = "default"
    stage1_args: list[str] = field(default_factory=list)
    stage2_args: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["usr", "bertscore"])
    reference_arm: str = "xrec"
    notes: str = ""


def validate_suite(suite: Suite, where: str = "suite") -> Suite:
    """Check arm names and the reference arm; errors name the suite file."""
    if not suite.arms:
        raise ConfigError(f"{where}: the suite has no arms")
    bad = [arm for arm in suite.arms if arm not in ARMS]
    if bad:
        raise ConfigError(f"{where}: unknown arm(s) {bad}; known arms: {sorted(ARMS)}")
    if suite.reference_arm not in suite.arms:
        raise ConfigError(f"{where}: reference_arm {suite.reference_arm!r} is not among the arms {suite.arms}")
    return suite


def load_suite(path: str) -> Suite:
    """Read and validate a suite YAML; unknown arms and keys are errors that name the file."""
    import yaml

    from xrec_pl.tools.pipeline import resolve_config

    file = resolve_config(path)
    raw = yaml.safe_load(file.read_text()) or {}
    known = set(Suite.__dataclass_fields__)
    unexpected = sorted(set(raw) - known)
    if unexpected:
        raise ConfigError(f"{file}: unknown key(s) {unexpected}; allowed: {sorted(known)}")
    missing = [k for k in ("name", "arms", "out_dir", "stage1_config", "stage2_config") if k not in raw]
    if missing:
        raise ConfigError(f"{file}: missing key(s) {missing}")
    return validate_suite(Suite(**raw), str(file))
