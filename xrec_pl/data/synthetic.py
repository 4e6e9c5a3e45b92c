"""A small deterministic dataset in the XRec format, with structure a graph model can learn.

Generation (all from one ``numpy.random.Generator(seed)``):

- **Items** have a visible genre (one of ``num_genres``), tone, length and topic, written into their title and
  profile, a popularity (log-normal), and a *hidden community* (one of ``num_communities``, independent of genre).
- **Users** have a visible taste (a sparse Dirichlet mixture over genres, plus a preferred tone), written into their
  profile, and a *hidden community*, independent of their taste.
- **Interactions**: each user picks 15-25 items (default preset) without replacement, with probability proportional
  to ``exp(log taste[genre] + tone match + community match + 0.5 * log popularity)`` (Gumbel top-k). Each user's
  edges are split about 80/10/10 into ``trn``/``val``/``tst``; every user has edges in all three splits.
- **Text records** are (uid, iid) edges sampled from each graph split, so a record's split is its edge's split,
  as in the real data. Title, user profile, item profile and explanation come from templates with several
  variants each.

**Graph-only part of every explanation.** Each explanation ends with one sentence naming the *user's hidden
community*, one of :data:`COMMUNITIES` (e.g. "the harbour book exchange"). Community names and their words occur in
no title, user profile or item profile; the community is not correlated with genre or tone. It is recoverable only
from the interaction graph: users of a community interact far more with that community's items, so collaborative
embeddings separate the communities while the text alone leaves the sentence at chance (1 / ``num_communities``).
The rest of the explanation (genre, tone, topic, length) restates information that is in the profiles.

Files written: ``para_dict.pickle`` (plain dict of ints and lists of ints), ``total_{trn,val,tst}.csv``,
``{trn,val,tst}.pkl`` (pandas DataFrames with object-dtype columns, like the reference release), ``meta.json`` and
``README.md``. The same seed gives byte-identical files.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from xrec_pl.errors import DataError
from xrec_pl.utils import atomic_write_text, atomic_write_with, dump_json

GENRES = ("mystery", "fantasy", "romance", "science fiction", "history", "horror", "poetry", "travel")
TONES = ("dark", "cheerful", "thoughtful", "fast-paced")
LENGTHS = ("short", "long")
# Hidden community names: the only graph-only content of the explanations. No word here may occur in any other
# template list below (tests check the generated text).
COMMUNITIES = (
    "the harbour book exchange",
    "the midnight lantern circle",
    "the rooftop audiobook collective",
    "the riverside swap meet",
    "the orchard lending guild",
    "the tram depot zine club",
)
GRAPH_ONLY_WORDS = ("harbour", "exchange", "midnight", "lantern", "circle", "rooftop", "audiobook", "collective")
GRAPH_ONLY_WORDS += ("riverside", "swap", "meet", "orchard", "lending", "guild", "tram", "depot", "zine", "club")

_NOUNS = {
    "mystery": ("Clue", "Alibi", "Witness", "Cipher", "Locked Room", "Inspector", "Vanishing", "Ledger"),
    "fantasy": ("Dragon", "Crown", "Sorcerer", "Kingdom", "Sword", "Oracle", "Wyrm", "Spellbook"),
    "romance": ("Heart", "Kiss", "Promise", "Wedding", "Summer Letter", "Sweetheart", "Vow", "Waltz"),
    "science fiction": ("Starship", "Android", "Colony", "Signal", "Nebula", "Reactor", "Orbit", "Clone"),
    "history": ("Empire", "Revolution", "Dynasty", "Siege", "Chronicle", "Treaty", "Pharaoh", "Frontier"),
    "horror": ("Haunting", "Crypt", "Shadow", "Asylum", "Curse", "Doll", "Fog", "Cellar"),
    "poetry": ("Verses", "Sonnets", "Elegy", "Hymns", "Odes", "Ballads", "Psalm", "Refrain"),
    "travel": ("Road", "Journey", "Passport", "Voyage", "Trail", "Compass", "Atlas", "Caravan"),
}
_ADJECTIVES = (
    "Silent", "Crimson", "Hidden", "Last", "Golden", "Broken", "Endless", "Silver",
    "Wild", "Forgotten", "Burning", "Quiet", "Hollow", "Distant", "Bright", "Frozen",
)  # fmt: skip
_TITLE_PATTERNS = ("The {adj} {noun}", "{noun} of the {adj} Sky", "A {adj} {noun}")
_TOPICS = {
    "mystery": ("a detective chasing a careful thief", "a family secret buried for decades"),
    "fantasy": ("an apprentice who steals a forbidden spell", "two kingdoms bound by an old prophecy"),
    "romance": ("two rivals who slowly fall in love", "a second chance at a first love"),
    "science fiction": ("a crew stranded far from Earth", "a machine that starts to dream"),
    "history": ("a soldier caught between two empires", "the rise and fall of a merchant family"),
    "horror": ("a house that remembers its owners", "a town where nobody sleeps"),
    "poetry": ("loss, memory and the changing seasons", "small everyday moments of joy"),
    "travel": ("a year spent crossing deserts by bus", "walking the length of a mountain range"),
}
_TONE_WORDS = {
    "dark": ("dark", "brooding"),
    "cheerful": ("cheerful", "uplifting"),
    "thoughtful": ("thoughtful", "reflective"),
    "fast-paced": ("fast-paced", "gripping"),
}
_USER_TEMPLATES = (
    "This user mostly reads {g1} books, with some {g2} on the side, and tends to prefer {tone} stories.",
    "Based on their reviews, the user enjoys {g1} above all, also likes {g2}, and rates {tone} books highly.",
    "A reader of {g1} and {g2} who is drawn to {tone} writing and memorable characters.",
    "The user's history shows a strong liking for {g1}, a steady interest in {g2}, and a taste for {tone} plots.",
)
_ITEM_TEMPLATES = (
    "{title} is a {length} {tone} {genre} book about {topic}.",
    "{A_tone} {genre} title about {topic}; a {length} read.",
    "Fans of {tone} {genre} will like this {length} book about {topic}.",
)
_OPENERS = (
    "The user would enjoy {title}, {a_tone} {genre} book they will favour.",
    "The user would buy {title} because they love {tone} {genre}.",
    "{title} suits this user's taste for {tone} {genre}.",
    "This user should like {title}, since {tone} {genre} is their favourite.",
)
_REASONS = (
    "Its story about {topic} will hold them.",
    "They will like this {length} read about {topic}.",
    "The plot about {topic} matches what they praise.",
)
_COMMUNITY_SENTENCES = (
    "It is also a favourite at {community}, where this user belongs.",
    "Like other members of {community}, they will pass it on.",
    "Readers from {community} keep recommending it.",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of a synthetic dataset. ``records`` is the number of text records per split (trn, val, tst)."""

    num_users: int = 600
    num_items: int = 500
    num_genres: int = 8
    num_communities: int = 4
    min_interactions: int = 15
    max_interactions: int = 25
    records: tuple[int, int, int] = (400, 60, 60)
    community_weight: float = 1.5  # log-odds bonus for an item of the user's community (graph-only signal)
    tone_weight: float = 0.7


SyntheticSize = Literal["default", "tiny", "smoke"]
PRESETS = {
    "default": SyntheticConfig(),
    "tiny": SyntheticConfig(
        num_users=60, num_items=50, num_genres=4, num_communities=3, min_interactions=10, max_interactions=16,
        records=(40, 10, 10),
    ),
    # the default graph and training records with a 4x larger test split: more paired records for significance
    "smoke": SyntheticConfig(records=(400, 60, 240)),
}  # fmt: skip
_FILES = ("para_dict.pickle", "total_trn.csv", "total_val.csv", "total_tst.csv", "trn.pkl", "val.pkl", "tst.pkl")


def _titles(rng: np.random.Generator, genres: np.ndarray, genre_names: tuple[str, ...]) -> list[str]:
    pools = {}
    for g, name in enumerate(genre_names):
        combos = [p.format(adj=a, noun=n) for p in _TITLE_PATTERNS for a in _ADJECTIVES for n in _NOUNS[name]]
        pools[g] = [combos[k] for k in rng.permutation(len(combos))]
    used = dict.fromkeys(range(len(genre_names)), 0)
    titles = []
    for g in genres.tolist():
        titles.append(pools[g][used[g]])
        used[g] += 1
    return titles


def _generate(cfg: SyntheticConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    genre_names = GENRES[: cfg.num_genres]
    n_u, n_i, k_g, k_c = cfg.num_users, cfg.num_items, cfg.num_genres, cfg.num_communities

    # Items: visible attributes + hidden community + popularity.
    item_genre = rng.integers(0, k_g, n_i)
    item_tone = rng.integers(0, len(TONES), n_i)
    item_length = rng.integers(0, len(LENGTHS), n_i)
    item_topic = rng.integers(0, 2, n_i)
    item_comm = rng.integers(0, k_c, n_i)
    item_pop = rng.lognormal(0.0, 0.8, n_i)
    titles = _titles(rng, item_genre, genre_names)

    # Users: visible genre taste and tone, hidden community.
    taste = rng.dirichlet(np.full(k_g, 0.3), n_u)  # (U, G)
    user_tone = rng.integers(0, len(TONES), n_u)
    user_comm = rng.integers(0, k_c, n_u)

    score = (
        np.log(taste[:, item_genre] + 1e-2)  # (U, I)
        + cfg.tone_weight * (user_tone[:, None] == item_tone[None, :])
        + cfg.community_weight * (user_comm[:, None] == item_comm[None, :])
        + 0.5 * np.log(item_pop)[None, :]
    )
    keys = score + rng.gumbel(size=score.shape)  # Gumbel top-k == sampling without replacement ∝ exp(score)
    order = np.argsort(-keys, axis=1, kind="stable")
    counts = rng.integers(cfg.min_interactions, cfg.max_interactions + 1, n_u)

    edges = {s: [] for s in ("trn", "val", "tst")}
    for u in range(n_u):
        items = order[u, : counts[u]]  # already in random order (sampled by key)
        n_hold = max(1, round(0.1 * counts[u]))
        edges["val"].extend((u, int(i)) for i in items[:n_hold])
        edges["tst"].extend((u, int(i)) for i in items[n_hold : 2 * n_hold])
        edges["trn"].extend((u, int(i)) for i in items[2 * n_hold :])
    edges = {s: np.array(sorted(e), dtype=np.int64).reshape(-1, 2) for s, e in edges.items()}  # (N, 2) each

    return {
        "rng": rng,
        "genre_names": genre_names,
        "item": {
            "genre": item_genre,
            "tone": item_tone,
            "length": item_length,
            "topic": item_topic,
            "comm": item_comm,
            "title": titles,
        },
        "user": {"taste": taste, "tone": user_tone, "comm": user_comm},
        "edges": edges,
    }


def _para_dict(edges: dict[str, np.ndarray], n_u: int, n_i: int) -> dict:
    para: dict = {}
    for split, e in edges.items():
        user_nb: list[list[int]] = [[] for _ in range(n_u)]
        item_nb: list[list[int]] = [[] for _ in range(n_i)]
        for u, i in e.tolist():
            user_nb[u].append(i)
            item_nb[i].append(u)
        para[f"{split}_user_nb"] = user_nb
        para[f"{split}_item_nb"] = item_nb
    para["user_num"] = n_u
    para["item_num"] = n_i
    return para


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _records(data: dict, split: str, count: int) -> pd.DataFrame:
    rng = data["rng"]
    gnames, item, user = data["genre_names"], data["item"], data["user"]
    edges = data["edges"][split]
    chosen = edges[rng.choice(len(edges), size=min(count, len(edges)), replace=False)]
    rows = []
    for u, i in chosen.tolist():
        top = np.argsort(-user["taste"][u], kind="stable")
        tone_u = _TONE_WORDS[TONES[user["tone"][u]]]
        user_summary = _pick(rng, _USER_TEMPLATES).format(g1=gnames[top[0]], g2=gnames[top[1]], tone=_pick(rng, tone_u))
        genre = gnames[item["genre"][i]]
        fields = {
            "title": item["title"][i],
            "genre": genre,
            "tone": _pick(rng, _TONE_WORDS[TONES[item["tone"][i]]]),
            "length": LENGTHS[item["length"][i]],
            "topic": _TOPICS[genre][item["topic"][i]],
        }
        fields["a_tone"] = ("an " if fields["tone"][0] in "aeiou" else "a ") + fields["tone"]
        fields["A_tone"] = fields["a_tone"].capitalize()
        item_summary = _pick(rng, _ITEM_TEMPLATES).format(**fields)
        explanation = " ".join(
            (
                _pick(rng, _OPENERS).format(**fields),
                _pick(rng, _REASONS).format(**fields),
                _pick(rng, _COMMUNITY_SENTENCES).format(community=COMMUNITIES[user["comm"][u]]),
            )
        )
        rows.append((u, i, item["title"][i], user_summary, item_summary, explanation))
    cols = list(zip(*rows))
    df = pd.DataFrame(
        {
            "uid": np.asarray(cols[0], dtype=np.int64),
            "iid": np.asarray(cols[1], dtype=np.int64),
            # object dtype (not pandas 3's Arrow strings) so the pickles look like the reference's and load anywhere
            **{name: pd.Series(list(c), dtype=object) for name, c in zip(("title", "user_summary"), cols[2:4])},
            **{name: pd.Series(list(c), dtype=object) for name, c in zip(("item_summary", "explanation"), cols[4:6])},
        }
    )
    df.columns = pd.Index(list(df.columns), dtype=object)
    return df


def _csv_text(edges: np.ndarray) -> str:
    return "user,item\n" + "".join(f"{u},{i}\n" for u, i in edges.tolist())


def _readme(cfg: SyntheticConfig, seed: int, size: str, counts: dict) -> str:
    return (
        f"# Synthetic XRec-format dataset (seed {seed}, preset '{size}')\n\n"
        "Generated by `xrec_pl.data.synthetic.make_synthetic`; regenerate with\n"
        f"`xrec-pl make-synthetic --out DIR --seed {seed} --size {size}` (byte-identical).\n\n"
        f"- {cfg.num_users} users, {cfg.num_items} items, {cfg.num_genres} genres, "
        f"{cfg.num_communities} hidden communities\n"
        f"- interactions trn/val/tst: {counts['trn']} / {counts['val']} / {counts['tst']}\n"
        f"- text records trn/val/tst: {counts['records'][0]} / {counts['records'][1]} / {counts['records'][2]}\n\n"
        "Users have visible genre/tone tastes (in their profiles) and a hidden community; items have visible\n"
        "genre/tone/length/topic (in title and profile) and a hidden community. Interactions follow tastes and\n"
        "favour items of the user's community.\n\n"
        "Graph-only part: the last sentence of every explanation names the user's hidden community\n"
        "(e.g. 'the harbour book exchange'). It appears in no title or profile and is recoverable only from the\n"
        "interaction graph.\n"
    )


def make_synthetic(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: SyntheticSize = "default",
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    records: tuple[int, int, int] | None = None,
) -> Path:
    """Write a deterministic synthetic dataset in the XRec format (see module docstring) and return its folder.

    Args:
        out_dir: destination folder (created). A folder already holding XRec data not made by this function is
            refused with :class:`~xrec_pl.data.io.DataError`, so real data is never overwritten; an earlier synthetic
            dataset is replaced.
        seed: random seed; the same seed, size and overrides give byte-identical files.
        size: ``"default"`` (600 users, 500 items, 400/60/60 records; a CPU first run), ``"smoke"`` (the same with
            240 test records, for the smoke suite's paired tests) or ``"tiny"`` (60 users,
            50 items, 40/10/10 records; unit tests).
        num_users: override the preset's number of users.
        num_items: override the preset's number of items.
        records: override the number of text records per split ``(trn, val, tst)``.

    Returns:
        ``Path(out_dir)``.
    """
    if size not in PRESETS:
        raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
    cfg = PRESETS[size]
    overrides = {"num_users": num_users, "num_items": num_items, "records": tuple(records) if records else None}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.num_items < 2 * cfg.max_interactions or cfg.num_users < 2:
        raise ValueError(f"too few items/users for {cfg.max_interactions} interactions per user: {cfg}")
    out = Path(out_dir)
    if (out / "para_dict.pickle").exists() and not (out / "meta.json").exists():
        raise DataError(f"{out}: holds XRec data not made by make_synthetic; refusing to overwrite it")

    data = _generate(cfg, seed)
    edges = data["edges"]
    frames = {s: _records(data, s, n) for s, n in zip(("trn", "val", "tst"), cfg.records)}
    para = _para_dict(edges, cfg.num_users, cfg.num_items)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "para_dict.pickle", lambda p: p.write_bytes(pickle.dumps(para, protocol=4)))
    for split, e in edges.items():
        atomic_write_text(out / f"total_{split}.csv", _csv_text(e))
        atomic_write_with(out / f"{split}.pkl", lambda p, df=frames[split]: p.write_bytes(pickle.dumps(df, protocol=4)))
    counts = {s: len(e) for s, e in edges.items()} | {"records": [len(frames[s]) for s in ("trn", "val", "tst")]}
    meta = {
        "generator": "xrec_pl.data.synthetic.make_synthetic",
        "seed": seed,
        "size": size,
        "config": asdict(cfg),
        "counts": counts,
        "genres": list(data["genre_names"]),
        "communities": list(COMMUNITIES[: cfg.num_communities]),
        "graph_only": "last sentence of each explanation names the user's hidden community (user_community below)",
        "user_community": data["user"]["comm"].tolist(),
        "item_community": data["item"]["comm"].tolist(),
        "item_genre": data["item"]["genre"].tolist(),
    }
    dump_json(out / "meta.json", meta)
    atomic_write_text(out / "README.md", _readme(cfg, seed, size, counts))
    return out
