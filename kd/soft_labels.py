"""Teacher soft labels computed once: the teacher's logits (all, or top-k) for every token.

Every trial of a sweep distils from the same teacher on the same blocks, so its outputs
are computed once and a trial reads them instead of running the teacher. The
cache keeps, per training block and position, the teacher's *raw* logits in fp16, in one
of three layouts (``teacher.soft_label_format``; :func:`resolve_format`): all V of them
(``dense``, exact at every temperature; the default up to V = 8,192), ``compact`` (the k
largest + their ids + the tail's log-partition on a grid of 1/T, :mod:`kd.compact`:
exact on k + 1 buckets at every T of the grid; the default above), or ``topk`` (the k
largest renormalised: exact only at T = 1). Ids are int16 when the vocabulary fits,
else int32. The temperature is applied
at training time (:func:`kd.losses.distillation_loss` takes them as ``teacher_logits``,
or ``topk_values``/``topk_indices``), so one cache serves a whole temperature sweep.

Layout, under ``teacher.soft_labels_dir`` (default ``cache_dir()/soft_labels``)::

    <fingerprint>/manifest.json                 key, k, shapes, dtypes, sha256 per shard
    <fingerprint>/shard-00000.safetensors       block_index (n,), topk_values (n, T, k) and,
    ...                                         unless k = V, topk_indices (n, T, k); T = block_size - 1

The fingerprint (:func:`kd.cache.fingerprint` of :func:`cache_key`) covers the teacher's
weights (a hash of its safetensors files), the tokenizer, the packed blocks (by the
source's contents), the block length, k, the grid and the precision (resolved: ``auto``
on this machine). A cache is
written into a temp dir and renamed into place (readers see all of it or nothing), and
checked before use: a shard whose sha256 differs from the manifest, or a manifest whose
key differs from the one asked for, raises :class:`SoftLabelsError` (one line) and
:func:`ensure_soft_labels` rebuilds it; nothing wrong is used silently.

The teacher pass is :class:`TopKTeacher`, a callable class that Ray Data runs with
``map_batches`` on an actor pool (one teacher per actor, a GPU each where the cluster has
them: :func:`build_with_ray`), or that a plain loop runs in-process
(:func:`build_local`, what a single ``kd distill`` and a trial that finds no cache use).
Nothing here imports Ray at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.numpy import save as save_numpy

from kd.cache import file_digest, fingerprint, temp_dir_beside
from kd.cache import publish_dir as _publish
from kd.cache import sha256_file as _sha256_file
from kd.compact import compress, sample_tail, temperature_grid
from kd.config import ConfigError, KDConfig
from kd.paths import cache_dir

FORMAT = 1
#: ``teacher.soft_label_format=auto`` stores every logit up to this vocabulary (2 bytes x V:
#: 16 KB per token, the world's 2,048 is 4 KB) and the compact format above it (at
#: V = 32,000, k = 64: 328 bytes, 0.5% of dense).
AUTO_DENSE_MAX_VOCAB = 8192
#: k of the compact (and top-k) format when teacher.top_k = 0.
DEFAULT_K = 64
TAIL_FIELDS = ("tail_lse", "tail_slope")
#: The compact format's sampled tail (kd.compact.sample_tail): (n, T, S) ids and fp16 logits.
SAMPLE_FIELDS = ("tail_ids", "tail_values")
#: Seeds the tail draws per block (with the block's index): a rebuilt cache, locally or on
#: Ray with any batching, draws the same ids.
SAMPLE_SEED = 0x5EED
MANIFEST = "manifest.json"
#: Blocks per shard file: ~17 MB at k=128, 128-token blocks (shards checksum and load
#: one at a time; many tiny files would cost more in opens than they save).
SHARD_BLOCKS = 256
#: Blocks per teacher forward (a (8, 127, V) fp32 logits tensor is 8 MB at V=2048 and
#: 200 MB at V=50k: bounded whatever the vocabulary).
MICRO_BATCH = 8

TeacherFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class SoftLabelsError(RuntimeError):
    """A soft-label cache that must not be used (missing, corrupt, or for other inputs)."""


# --------------------------------------------------------------------------- keys


def weights_fingerprint(source: str) -> str:
    """A hash of the teacher's weights: sha256 over its safetensors files (names and bytes)
    and its ``config.json`` (the architecture that turns the weights into logits).

    For a hub id, the files of the locally cached snapshot. The full hash of a large
    teacher takes a while (~1 GB/s), so it is remembered per file identity (path, size,
    inode, mtime, ctime) in ``cache_dir()/file_digests.json`` (:func:`kd.cache.file_digest`):
    a trial only stats the files.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not cached locally: the id is all we know
            return fingerprint({"hub": source})
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise SoftLabelsError(f"teacher {source!r} has no .safetensors weights to fingerprint")
    memo = cache_dir() / "file_digests.json"
    config = root / "config.json"
    return fingerprint({"weights": [(f.name, file_digest(f, memo)) for f in files],
                        "config": file_digest(config, memo) if config.is_file() else None})


def resolve_format(cfg: KDConfig, n_vocab: int) -> tuple[str, int]:
    """``(format, k)`` the cache stores for ``cfg`` and a vocabulary of ``n_vocab``.

    ``auto``: dense while top_k = 0 and V <= :data:`AUTO_DENSE_MAX_VOCAB`, else compact.
    A k at or above V is dense whatever the format (every logit is kept).
    """
    fmt, k = cfg.teacher.soft_label_format, cfg.teacher.top_k
    if fmt == "auto":
        fmt = "dense" if k == 0 and n_vocab <= AUTO_DENSE_MAX_VOCAB else "compact"
    if fmt == "dense":
        return "dense", n_vocab
    k = min(k or DEFAULT_K, n_vocab)
    return ("dense", n_vocab) if k >= n_vocab else (fmt, k)


def grid_betas(cfg: KDConfig) -> tuple[float, ...]:
    """The compact format's inverse temperatures, from teacher.grid_*."""
    t = cfg.teacher
    return temperature_grid(t.grid_min_temperature, t.grid_max_temperature, t.grid_points)


def check_temperatures(cfg: KDConfig, low: float, high: float, n_vocab: int | None = None) -> None:
    """Refuse (one-line :class:`ConfigError`) a temperature range the cache cannot serve.

    For a sweep: ``low``/``high`` are the smallest and largest ``loss.temperature`` its
    trials may take. Only the compact format is limited (to its grid); dense and top-k
    caches take any T. With ``n_vocab`` unknown, ``auto`` is checked as if compact.
    """
    if cfg.teacher.mode != "cache" or cfg.loss.kd_weight == 0:
        return
    fmt = resolve_format(cfg, n_vocab)[0] if n_vocab else cfg.teacher.soft_label_format
    if fmt not in ("compact", "auto"):
        return
    lo, hi = cfg.teacher.grid_min_temperature, cfg.teacher.grid_max_temperature
    if not (lo <= low <= high <= hi):
        raise ConfigError(f"loss.temperature range [{low:g}, {high:g}] is not allowed: the compact soft-label "
                          f"cache serves T in [{lo:g}, {hi:g}]; widen teacher.grid_min_temperature/"
                          "teacher.grid_max_temperature or narrow the sweep")


def cache_key(cfg: KDConfig, teacher_source: str, tokenizer: Any, precision: str | None = None) -> dict[str, Any]:
    """Everything the cached logits depend on (the fingerprint hashes this).

    ``precision``: the teacher pass's, resolved (``bf16`` or ``fp32``); by default what
    ``train.precision`` resolves to here (:func:`kd.device.resolve_precision`).
    """
    from kd.data import blocks_fingerprint, tokenizer_fingerprint
    from kd.device import resolve_precision

    n_vocab = len(tokenizer)
    fmt, k = resolve_format(cfg, n_vocab)
    key = {
        "format": FORMAT,
        "teacher": weights_fingerprint(teacher_source),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "blocks": blocks_fingerprint(cfg.data, tokenizer),
        "block_size": cfg.data.block_size,
        "k": k,  # k = V: dense
        "precision": precision or resolve_precision(cfg.train.device, cfg.train.precision),
    }
    if fmt == "compact":  # the grid, not the temperature: one cache serves a sweep's range
        key.update(layout="compact", betas=list(grid_betas(cfg)))
        if cfg.teacher.tail_samples:
            key.update(tail_samples=cfg.teacher.tail_samples, proposal_temperature=cfg.teacher.proposal_temperature,
                       sample_seed=SAMPLE_SEED)
    return key


def cache_root(cfg: KDConfig) -> Path:
    root = cfg.teacher.soft_labels_dir
    return Path(root).expanduser() if root else cache_dir() / "soft_labels"


def cache_path(cfg: KDConfig, key: dict[str, Any]) -> Path:
    return cache_root(cfg) / fingerprint(key)


# ------------------------------------------------------------------ teacher pass


def _index_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.int16) if n_vocab <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


class TopKTeacher:
    """The teacher's top-k logits for a batch of block ids; a Ray Data callable class.

    Constructed once per actor (the teacher loads once), then called with batches
    ``{"data": (n,) block ids}`` (``ray.data.from_numpy``'s column name); returns
    ``{"block_index" (n,), "topk_values" (n, T, k) fp16}`` plus ``"topk_indices" (n, T, k)``
    unless k = V (then the values are every logit, in vocabulary order).

    Args:
        teacher_source: a ``save_pretrained`` directory or hub id.
        blocks: the training blocks (N, L) int64, or a Ray ObjectRef to them.
        n_vocab: the tokenizer's length (logits past it are LM-head padding).
        k: logits kept per token.
        precision: the cache key's (``bf16`` or ``fp32``, resolved by :func:`ensure_soft_labels`
            where the key is made, so that every actor computes what the key says).
        threads: torch threads (Ray sets OMP_NUM_THREADS=1 in its workers).
    """

    def __init__(self, teacher_source: str, blocks: Any, n_vocab: int, k: int, precision: str = "auto",
                 threads: int = 0, device: str = "auto", trust_remote_code: bool = False,
                 betas: tuple[float, ...] | None = None, tail_samples: int = 0,
                 proposal_temperature: float = 4.0):
        from kd.device import pick_device, use_fast_attention, use_threads
        from kd.models import load_pretrained

        if not isinstance(blocks, torch.Tensor):  # an ObjectRef shipped to a Ray actor
            import ray

            blocks = ray.get(blocks)
        use_threads(threads)
        self.blocks, self.n_vocab, self.k, self.precision = blocks, n_vocab, k, precision
        self.betas = tuple(betas) if betas else None  # compact: the tail's grid
        self.tail_samples, self.proposal_temperature = tail_samples, proposal_temperature
        self.device = pick_device(device)
        model, _ = load_pretrained(teacher_source, trust_remote_code=trust_remote_code)
        # Frozen: eval() so the targets are deterministic (no dropout), no_grad in __call__.
        self.model = model.to(self.device).eval()
        use_fast_attention(self.model, self.device, int(blocks.shape[1]) - 1)
        self.index_dtype = _index_dtype(n_vocab)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kd.device import autocast_for
        from kd.models import logits_for

        ids = np.asarray(batch["data"], dtype=np.int64)
        out_i, out_v, out_t = [], [], {name: [] for name in (*TAIL_FIELDS, *SAMPLE_FIELDS)}
        for start in range(0, len(ids), MICRO_BATCH):
            x = self.blocks[torch.from_numpy(ids[start:start + MICRO_BATCH])][:, :-1].to(self.device)
            with autocast_for(self.device, self.precision):
                logits = logits_for(self.model, x, self.n_vocab)  # (b, T, V)
            if self.k >= self.n_vocab:  # dense: every logit in vocabulary order, no ids needed
                out_v.append(logits.half().cpu().numpy())
                continue
            if self.betas:  # compact: + the tail's log-partition on the grid (of the fp16 logits)
                b, t, v = logits.shape
                values, indices, lse, slope = compress(logits.reshape(b * t, v), self.k, self.betas)
                values, indices = values.reshape(b, t, -1), indices.reshape(b, t, -1)
                out_t["tail_lse"].append(lse.reshape(b, t, -1).cpu().numpy())
                out_t["tail_slope"].append(slope.reshape(b, t, -1).cpu().numpy())
                if self.tail_samples:  # + S draws from the tail, seeded per block
                    draws = [sample_tail(logits[i], indices[i], self.tail_samples, self.proposal_temperature,
                                         torch.Generator(device=logits.device).manual_seed(SAMPLE_SEED + int(block)))
                             for i, block in enumerate(ids[start:start + MICRO_BATCH])]
                    out_t["tail_ids"].append(np.stack([d[0].cpu().numpy().astype(self.index_dtype) for d in draws]))
                    out_t["tail_values"].append(np.stack([d[1].cpu().numpy() for d in draws]))
            else:
                values, indices = logits.topk(self.k, dim=-1)  # (b, T, k), raw logits: T is applied later
            out_i.append(indices.cpu().numpy().astype(self.index_dtype))
            out_v.append(values.half().cpu().numpy())
        out = {"block_index": ids, "topk_values": np.concatenate(out_v)}
        if out_i:
            out["topk_indices"] = np.concatenate(out_i)
        for name, parts in out_t.items():
            if parts:
                out[name] = np.concatenate(parts)
        return out


def build_local(teacher_args: dict[str, Any], n_blocks: int, batch_size: int = 32) -> Iterable[dict[str, np.ndarray]]:
    """The teacher pass as a plain loop in this process (no Ray)."""
    fn = TopKTeacher(**teacher_args)
    for start in range(0, n_blocks, batch_size):
        yield fn({"data": np.arange(start, min(n_blocks, start + batch_size))})


def build_with_ray(teacher_args: dict[str, Any], n_blocks: int, batch_size: int = 32,
                   actors: int | None = None) -> Iterable[dict[str, np.ndarray]]:
    """The teacher pass as Ray Data batch inference over block ids, on an actor pool.

    One teacher per actor; one GPU per actor where the cluster has GPUs (as many actors as
    GPUs), else one actor per ``threads`` CPUs. The blocks go to the object store once and
    every actor reads them from there. Needs ``ray.init`` done.
    """
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    threads = int(teacher_args.get("threads") or (1 if gpus else max(1, cpus)))
    if actors is None:
        actors = gpus if gpus else max(1, cpus // threads)
    args = {**teacher_args, "threads": threads, "blocks": ray.put(teacher_args["blocks"])}
    # The ids as in-memory blocks: ray.data.range would add read tasks that need a CPU of
    # their own, and with the actors holding every CPU of a small machine they never run.
    ids = np.arange(n_blocks, dtype=np.int64)
    ds = ray.data.from_numpy([ids[i:i + batch_size] for i in range(0, n_blocks, batch_size)])
    ds = ds.map_batches(
        TopKTeacher, fn_constructor_kwargs=args, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),  # the 2.60 form (``concurrency=`` is deprecated)
        num_cpus=1 if gpus else threads, num_gpus=1 if gpus else None,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# ------------------------------------------------------------------------ writing


def write_cache(path: Path, key: dict[str, Any], batches: Iterable[dict[str, np.ndarray]], *, n_blocks: int,
                n_vocab: int, extra: dict[str, Any] | None = None) -> Path:
    """Write teacher batches as shards + manifest into a temp dir, then rename it to ``path``.

    If ``path`` holds a bad cache it is moved aside first; if another process published a
    cache there meanwhile, theirs is kept and ours dropped.
    """
    tmp = temp_dir_beside(path)  # readable by the cluster's other nodes, as the umask allows
    shards: list[dict[str, Any]] = []
    pending: list[dict[str, np.ndarray]] = []
    seen = np.zeros(n_blocks, dtype=bool)
    shape: tuple[int, ...] = ()
    started = time.time()

    def flush() -> None:
        if not pending:
            return
        tensors = {name: np.ascontiguousarray(np.concatenate([b[name] for b in pending]))
                   for name in ("block_index", "topk_indices", "topk_values", *TAIL_FIELDS, *SAMPLE_FIELDS)
                   if name in pending[0]}
        pending.clear()
        data = save_numpy(tensors, metadata={"fingerprint": path.name})
        name = f"shard-{len(shards):05d}.safetensors"
        (tmp / name).write_bytes(data)
        shards.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "n_blocks": int(len(tensors["block_index"]))})

    try:
        for batch in batches:
            ids = np.asarray(batch["block_index"], dtype=np.int64)
            if seen[ids].any():
                raise SoftLabelsError(f"soft labels: block ids {ids[seen[ids]][:5].tolist()} computed twice")
            seen[ids] = True
            shape = tuple(batch["topk_values"].shape[1:])
            pending.append(batch)
            if sum(len(b["block_index"]) for b in pending) >= SHARD_BLOCKS:
                flush()
        flush()
        if not seen.all():
            raise SoftLabelsError(f"soft labels: {int((~seen).sum())} of {n_blocks} blocks missing "
                                  "from the teacher pass")
        manifest = {
            "format": FORMAT, "fingerprint": path.name, "key": key, "n_blocks": n_blocks,
            "positions": shape[0], "k": shape[1], "vocab": n_vocab, "dense": shape[1] >= n_vocab,
            "index_dtype": None if shape[1] >= n_vocab else str(_index_dtype(n_vocab)), "value_dtype": "float16",
            "shape": [n_blocks, *shape], "shards": shards, "created": time.time(),
            "layout": key.get("layout", "dense" if shape[1] >= n_vocab else "topk"), "betas": key.get("betas"),
            "tail_samples": key.get("tail_samples", 0), "proposal_temperature": key.get("proposal_temperature"),
            "build_s": round(time.time() - started, 3), **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------ reading


_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _memmap_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only ``np.memmap``: nothing is copied.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's
    dtype, shape and byte range, then the data. safetensors' own loaders return copies
    (``load``) or per-tensor reads; a memory map lets every trial of a sweep share the
    same page-cache pages and read only the rows it asks for.
    """
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - start != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name}: {end - start} bytes for shape {shape} {dtype}")
        out[name] = np.memmap(file, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    return out


@dataclass
class SoftLabels:
    """A verified cache, memory-mapped: the teacher's targets for any block ids on demand.

    Nothing is loaded up front; :meth:`lookup` copies only the rows a batch asks for, so a
    trial holds one batch of targets, not the cache (265 MB dense on the small world).
    A published cache is never written again (a rebuild publishes a new directory), so
    what the map shows is what was verified.
    """

    path: Path
    manifest: dict[str, Any]
    shards: list[dict[str, np.ndarray]]
    """Per shard file: ``topk_values`` (n, T, k) and, unless dense, ``topk_indices``."""
    shard_of: np.ndarray
    """(N,) which shard holds each block id."""
    row_of: np.ndarray
    """(N,) the block's row in that shard."""

    @property
    def compact(self) -> bool:
        """Top-k + the tail's log-partition grid (:mod:`kd.compact`)."""
        return self.manifest.get("layout") == "compact"

    @property
    def dense(self) -> bool:
        """All V logits in vocabulary order (k = V), so no ids are stored."""
        return bool(self.manifest["dense"])

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values (b, T, k) fp16, indices (b, T, k) or None when dense)`` for block ids (b,)."""
        k = self.manifest["shape"][2]
        fields = {"topk_values": (k, np.dtype(np.float16))}
        if not self.dense:
            fields["topk_indices"] = (k, np.dtype(self.manifest["index_dtype"]))
        values, *indices = self._gather(ids, fields)
        return values, (indices[0] if indices else None)

    def _gather(self, ids: np.ndarray, fields: dict[str, tuple[int, np.dtype]]) -> tuple[np.ndarray, ...]:
        """Each named shard field's rows for block ids (b,), as (b, T, width) arrays of its dtype."""
        ids = np.asarray(ids, dtype=np.int64)
        _, t, _ = self.manifest["shape"]
        out = tuple(np.empty((len(ids), t, width), dtype=dtype) for width, dtype in fields.values())
        which = self.shard_of[ids]
        for shard in np.unique(which):
            at = np.flatnonzero(which == shard)
            rows = self.row_of[ids[at]]
            for name, arr in zip(fields, out):
                arr[at] = self.shards[shard][name][rows]
        return out

    def lookup_tail(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(tail_lse, tail_slope)`` (b, T, G) fp32 for block ids (b,); compact caches only."""
        g = len(self.manifest["betas"])
        return self._gather(ids, {name: (g, np.dtype(np.float32)) for name in TAIL_FIELDS})

    def lookup_samples(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(tail_ids, tail_values)`` (b, T, S) for block ids (b,); caches with a sampled tail only."""
        s = self.manifest["tail_samples"]
        return self._gather(ids, {"tail_ids": (s, np.dtype(self.manifest["index_dtype"])),
                                  "tail_values": (s, np.dtype(np.float16))})

    @property
    def values(self) -> torch.Tensor:
        """Every block's values (N, T, k) in memory: for inspection and tests, not trials."""
        return torch.from_numpy(self.lookup(np.arange(self.manifest["n_blocks"]))[0])

    @property
    def indices(self) -> torch.Tensor | None:
        """Every block's ids (N, T, k), or None when dense: for inspection and tests."""
        idx = self.lookup(np.arange(self.manifest["n_blocks"]))[1]
        return None if idx is None else torch.from_numpy(idx)

    def teacher_fn(self, device: torch.device | None = None) -> TeacherFn:
        """A :data:`kd.train.TeacherFn` that looks a batch's targets up by ``block_index``."""

        def fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            dev = device or batch["input_ids"].device
            ids = batch["block_index"].cpu().numpy()
            values, indices = self.lookup(ids)
            if indices is None:  # dense: the exact loss of the online teacher (fp16 logits)
                return {"teacher_logits": torch.from_numpy(values).to(dev, non_blocking=True)}
            out = {"topk_indices": torch.from_numpy(indices).to(dev, non_blocking=True),
                   "topk_values": torch.from_numpy(values).to(dev, non_blocking=True)}
            if self.compact:  # the exact teacher on k + 1 buckets at any T of the grid
                lse, slope = self.lookup_tail(ids)
                out.update(topk_tail_lse=torch.from_numpy(lse).to(dev, non_blocking=True),
                           topk_tail_slope=torch.from_numpy(slope).to(dev, non_blocking=True),
                           tail_betas=tuple(self.manifest["betas"]))
                if self.manifest.get("tail_samples"):  # + the tail's shape, by importance weights
                    sid, sval = self.lookup_samples(ids)
                    out.update(tail_sample_indices=torch.from_numpy(sid).to(dev, non_blocking=True),
                               tail_sample_values=torch.from_numpy(sval).to(dev, non_blocking=True),
                               proposal_temperature=float(self.manifest["proposal_temperature"]))
            return out

        return fn


def _fail(path: Path, why: str) -> SoftLabelsError:
    return SoftLabelsError(f"soft-label cache {path} is not usable: {why}")


#: What a manifest must hold, with the types a reader relies on.
_MANIFEST_FIELDS = {"fingerprint": str, "key": dict, "n_blocks": int, "shape": list, "dense": bool, "shards": list}


def read_manifest(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the cache at ``path`` if it is for ``key``; else :class:`SoftLabelsError`."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise _fail(path, f"no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise _fail(path, f"unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict):
        raise _fail(path, f"{MANIFEST} is not a JSON object")
    for name, tp in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), tp):
            raise _fail(path, f"{MANIFEST} has no valid {name!r}")
    want = fingerprint(key)
    if manifest["fingerprint"] != want or manifest["key"] != key:
        diff = sorted(k for k in key if manifest["key"].get(k) != key[k])
        raise _fail(path, f"fingerprint mismatch (cache {manifest['fingerprint']}, expected {want}; "
                          f"differs in {', '.join(diff) or 'fingerprint'})")
    return manifest


def load_soft_labels(path: str | os.PathLike, key: dict[str, Any]) -> SoftLabels:
    """Open and verify a cache: manifest key, every shard's sha256, every block exactly once.

    Every shard is checksummed (streamed from disk) before any of its data is used, then
    memory-mapped; no shard is copied into this process.
    """
    path = Path(path)
    manifest = read_manifest(path, key)
    n, t, k = manifest["shape"]
    shard_of = np.full(n, -1, dtype=np.int32)
    row_of = np.zeros(n, dtype=np.int64)
    shards = []
    for number, shard in enumerate(manifest["shards"]):
        file = path / str(shard.get("file", ""))
        try:
            digest = _sha256_file(file)  # streamed: a shard is never held in memory whole
        except OSError as e:
            raise _fail(path, f"shard {shard.get('file')} unreadable ({e.strerror})") from None
        if digest != shard.get("sha256"):
            raise _fail(path, f"shard {shard['file']} fails its sha256 check (corrupted)")
        try:
            tensors = _memmap_safetensors(file)
        except (OSError, ValueError, KeyError) as e:
            raise _fail(path, f"shard {shard['file']} is not a valid safetensors file ({e})") from None
        ids = np.asarray(tensors.get("block_index", np.empty(0, dtype=np.int64)))
        bad_ids = len(ids) == 0 or ids.min() < 0 or ids.max() >= n
        if bad_ids or tensors["topk_values"].shape != (len(ids), t, k) or (shard_of[ids] >= 0).any() \
                or (not manifest["dense"] and tensors.get("topk_indices", np.empty(0)).shape != (len(ids), t, k)) \
                or (manifest.get("layout") == "compact" and any(
                    tensors.get(name, np.empty(0)).shape != (len(ids), t, len(manifest.get("betas") or []))
                    for name in TAIL_FIELDS)) \
                or any(tensors.get(name, np.empty(0)).shape != (len(ids), t, manifest.get("tail_samples", 0))
                       for name in SAMPLE_FIELDS if manifest.get("tail_samples")):
            raise _fail(path, f"shard {shard['file']} does not match the manifest")
        shard_of[ids] = number
        row_of[ids] = np.arange(len(ids))
        shards.append(tensors)
    if (shard_of < 0).any():
        raise _fail(path, f"{int((shard_of < 0).sum())} of {n} blocks missing")
    return SoftLabels(path, manifest, shards, shard_of, row_of)


# ---------------------------------------------------------------------- the entry


def ensure_soft_labels(
    cfg: KDConfig,
    teacher_source: str,
    tokenizer: Any,
    train_blocks: torch.Tensor,
    *,
    backend: str = "local",
    on_bad: str = "rebuild",
    progress: bool = False,
) -> SoftLabels:
    """The verified cache for ``cfg``, built (or rebuilt when bad) if needed.

    Args:
        backend: ``local`` (a loop in this process) or ``ray`` (Ray Data actors; needs
            ``ray.init``). Never ``ray`` inside a trial holding all of a small machine's
            CPUs: its actors would wait for them forever.
        on_bad: ``rebuild`` a missing or bad cache, or ``raise`` :class:`SoftLabelsError`.
    """
    check_temperatures(cfg, cfg.loss.temperature, cfg.loss.temperature, len(tokenizer))
    from kd.device import precisions_served

    # The entry of the precision train.precision resolves to here; with auto, else a whole
    # one another machine built in the other precision (kd.device.precisions_served).
    served = precisions_served(cfg.train.device, cfg.train.precision)
    key = cache_key(cfg, teacher_source, tokenizer, served[0])
    path = cache_path(cfg, key)
    bad = None
    if path.exists():
        try:
            return _checked(load_soft_labels(path, key), train_blocks)
        except SoftLabelsError as e:
            bad = e
    for precision in served[1:]:
        other = {**key, "precision": precision}  # cache_key's only precision-dependent field
        if cache_path(cfg, other).exists():
            try:
                return _checked(load_soft_labels(cache_path(cfg, other), other), train_blocks)
            except SoftLabelsError:
                pass  # not ours to rebuild: ours is built below
    if on_bad != "rebuild":
        raise bad or _fail(path, "not built yet")
    if bad is not None:
        print(f"{bad}; rebuilding it", file=sys.stderr, flush=True)
    args = dict(teacher_source=teacher_source, blocks=train_blocks, n_vocab=len(tokenizer), k=key["k"],
                precision=key["precision"], threads=cfg.train.threads, device=cfg.train.device,
                trust_remote_code=cfg.teacher.trust_remote_code, betas=key.get("betas"),
                tail_samples=key.get("tail_samples", 0), proposal_temperature=key.get("proposal_temperature", 4.0))
    if progress:
        print(f"soft labels: teacher {key.get('layout', 'top')}-{key['k']} logits for {len(train_blocks)} blocks ({backend}) -> {path}",
              flush=True)
    build = build_with_ray if backend == "ray" else build_local
    write_cache(path, key, build(args, len(train_blocks)), n_blocks=len(train_blocks), n_vocab=len(tokenizer),
                extra={"backend": backend, "teacher_source": str(teacher_source)})
    return _checked(load_soft_labels(path, key), train_blocks)


def _checked(labels: SoftLabels, train_blocks: torch.Tensor) -> SoftLabels:
    n, t, _ = labels.manifest["shape"]
    if (n, t + 1) != tuple(train_blocks.shape):
        raise _fail(labels.path, f"it covers {n} blocks of {t + 1} tokens, the data has {tuple(train_blocks.shape)}")
    return labels
