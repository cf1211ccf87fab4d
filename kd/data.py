"""Training text -> tokenized, packed blocks of fixed length, cached.

Sources: the embedded world, a hub dataset id (``wikitext`` with ``data.hub_config``), or
local .txt/.jsonl/.json/.parquet files (a file or a directory; files whose names start
with ``valid``/``val``/``test`` become those splits). Loading goes through Hugging Face
``datasets`` so hub ids and local files take one path. Documents are joined with the
tokenizer's eos token and cut into blocks of ``data.block_size`` tokens; the packed
blocks are cached as safetensors keyed by a fingerprint (:mod:`kd.cache`) of the data
config, the source's contents (a local file by its sha256, not its path: an edited file
is packed again) and the tokenizer, so every trial of a sweep reuses them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from kd.cache import atomic_file, file_digest, fingerprint
from kd.config import ConfigError, DataConfig
from kd.paths import cache_dir

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Blocks:
    """Packed token blocks: ``train`` (N, block_size) and ``val`` (M, block_size), int64."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor | None = None


def _split_of(path: Path) -> str:
    stem = path.stem.lower()
    if stem.startswith(("valid", "val", "dev")):
        return "validation"
    if stem.startswith("test"):
        return "test"
    return "train"


def _local_files(source: str) -> dict[str, list[str]]:
    """Map split -> files for a local file or directory, or raise a one-line error."""
    root = Path(source).expanduser()
    if not root.exists():
        raise ConfigError(f"data.source={source!r} is not allowed: the path does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in _BUILDERS)
    if not files:
        raise ConfigError(f"data.source={source!r} is not allowed: no {', '.join(_BUILDERS)} files found")
    kinds = {_BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(f"data.source={source!r} is not allowed: use files of one kind "
                          f"({', '.join(_BUILDERS)})")
    splits: dict[str, list[str]] = {}
    for p in files:
        splits.setdefault(_split_of(p) if root.is_dir() else "train", []).append(str(p))
    if "train" not in splits:
        raise ConfigError(f"data.source={source!r} is not allowed: no training file (names starting "
                          "with valid/val/test are held out)")
    return splits


def load_texts(cfg: DataConfig) -> dict[str, list[str]]:
    """Raw documents per split (``train`` always, ``validation``/``test`` when the source has them)."""
    import datasets

    if cfg.source == "world":
        from kd.world import ensure_world

        world = ensure_world(cfg.world_size, cfg.world_seed)
        ds = datasets.load_dataset("json", data_files={"train": str(world / "train.jsonl"),
                                                       "validation": str(world / "val.jsonl")})
    elif _is_local(cfg.source):
        files = _local_files(cfg.source)
        builder = _BUILDERS[Path(files["train"][0]).suffix]
        ds = datasets.load_dataset(builder, data_files=files)
    else:
        from kd.hub import offline_unless_reachable

        offline_unless_reachable()  # no network: fail at once, not after the hub client's retries
        try:
            ds = datasets.load_dataset(cfg.source, cfg.hub_config or None)
        except Exception as e:  # offline, unknown id, gated, bad config name: one line, not a traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"data.source={cfg.source!r} is not allowed: it is not an existing local path and "
                              f"could not be loaded as a hub dataset ({first})") from None
    out: dict[str, list[str]] = {}
    for split in ds:
        if cfg.text_column not in ds[split].column_names:
            raise ConfigError(f"data.text_column={cfg.text_column!r} is not allowed: split {split!r} of "
                              f"{cfg.source!r} has columns {ds[split].column_names}")
        name = "validation" if split in ("valid", "val", "dev") else split
        out[name] = [t for t in ds[split][cfg.text_column] if t and t.strip()]
    return out


def _pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Concatenate documents separated by eos and cut into full blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[np.ndarray] = []
    for start in range(0, len(texts), 1000):
        enc = tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]
        for seq in enc:
            ids.append(np.asarray(seq + [eos], dtype=np.int64))
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    n = len(flat) // block_size
    return torch.from_numpy(flat[: n * block_size].reshape(n, block_size).copy())


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normalisation, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint({"kind": "tokenizer", "definition": definition})


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~"))


def source_key(cfg: DataConfig) -> dict:
    """What the text of ``cfg.source`` is, for cache keys: values, never a name of something mutable.

    The world: its fingerprint (size, seed, generator version). A local file or directory:
    the sha256 of every file it is read from, streamed and remembered per file identity
    (:func:`kd.cache.file_digest`), with each file's name relative to the source (a
    ``valid*``/``test*`` name decides its split). A hub dataset: its id and config (its
    revision is the hub's business).
    """
    if cfg.source == "world":
        from kd.world import ensure_world

        return {"world": ensure_world(cfg.world_size, cfg.world_seed).name}
    if _is_local(cfg.source):
        root = Path(cfg.source).expanduser()
        memo = cache_dir() / "file_digests.json"
        files = {}
        for split, names in _local_files(cfg.source).items():
            for name in names:
                rel = Path(name).name if root.is_file() else str(Path(name).relative_to(root))
                files[rel] = {"split": split, "sha256": file_digest(Path(name), memo)}
        return {"files": files}
    return {"hub": cfg.source, "hub_config": cfg.hub_config}


def data_key(cfg: DataConfig) -> dict:
    """``{"data", "source"}`` for cache keys: every data setting but ``source`` (a path or
    an id), and :func:`source_key` (what that source holds) in its place."""
    data = asdict(cfg)
    data.pop("source")
    return {"data": data, "source": source_key(cfg)}


def blocks_fingerprint(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Cache key of the packed blocks: every data setting, the source's contents and the tokenizer."""
    return fingerprint({"kind": "blocks", **data_key(cfg), "tokenizer": tokenizer_fingerprint(tokenizer)})


def load_blocks(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Blocks:
    """Tokenized, packed train/validation(/test) blocks, built once and cached."""
    path = cache_dir() / "blocks" / f"{blocks_fingerprint(cfg, tokenizer)}.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        return Blocks(tensors["train"], tensors["val"], tensors.get("test"))
    texts = load_texts(cfg)
    train = _pack(texts["train"], tokenizer, cfg.block_size)
    if "validation" in texts:
        val = _pack(texts["validation"], tokenizer, cfg.block_size)
    else:
        # No validation split: hold out a seeded random share of blocks.
        g = torch.Generator().manual_seed(cfg.world_seed)
        perm = torch.randperm(len(train), generator=g)
        n_val = max(1, int(len(train) * cfg.val_fraction))
        val, train = train[perm[:n_val]], train[perm[n_val:]]
    test = _pack(texts["test"], tokenizer, cfg.block_size) if "test" in texts else None
    if cfg.max_blocks:
        train = train[: cfg.max_blocks]
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"data.block_size={cfg.block_size} is not allowed: {cfg.source!r} has too little "
                          "text for one training and one validation block")
    tensors = {"train": train, "val": val}
    if test is not None and len(test):
        tensors["test"] = test
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a concurrent trial sees the whole file or none
        save_file(tensors, str(tmp))
    return Blocks(train, val, tensors.get("test"))
