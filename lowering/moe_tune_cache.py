"""Tuned MoE kernel tiles: the shape-bucket key, the stored record, and the tables that hold them.

# T: tokens, k: experts per token, E: experts, H: hidden, I: expert intermediate size
A tuned entry is keyed by everything that changes which tiles win: the GPU (its name), the
Triton minor version (code generation changes between them), the weight and activation formats,
the activation dtype, the layer shape (E, k, H, I) and a bucket of T.  It stores only what the
tuner chooses (block_m, the two GEMMs' tiles, the L1 gate/up layout); everything that depends on
the exact T (align chunking, combine tiles) is still the heuristic's, so an entry is valid for any
T of its bucket.

Lookup order: this process's tuning > the user cache file (``~/.cache/inductor_moe/moe_tuned.json``,
env ``INDUCTOR_MOE_TUNE_CACHE``) > the table shipped for the device
(``lowering/tuned/<device-slug>.json``, read only) > none (the caller uses the heuristic).  A
missing, unreadable or corrupt file, or an entry that fails validation, is skipped with a debug
log, never an error: a bad cache must not break a model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .moe_plan import GemmTiles, MoEKernelConfig, swap_ab_tail_block_m

log = logging.getLogger("inductor_moe.tune")

FILE_FORMAT = 1  # bumped when the JSON layout changes; other versions are ignored
CACHE_ENV = "INDUCTOR_MOE_TUNE_CACHE"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "inductor_moe", "moe_tuned.json")
SHIPPED_DIR = Path(__file__).parent / "tuned"  # read at lookup time (tests point it elsewhere)
DECODE_BUCKETS = (1, 4, 16)  # T <= 16 (weight-bandwidth bound): 1, 2-4, 5-16; then powers of two
DTYPE_LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
BLOCK_M_CHOICES = (16, 32, 64, 128, 256)  # what MoEKernelConfig accepts


def token_bucket(num_tokens: int) -> int:
    """The upper end of T's bucket: 1, 4, 16 (decode: 1, 2-4, 5-16), then the next power of two
    (17-32 -> 32, ..., 4097-8192 -> 8192).  Tile choice moves with log T, not with T itself."""
    for b in DECODE_BUCKETS:
        if num_tokens <= b:
            return b
    return 1 << (num_tokens - 1).bit_length()


@functools.lru_cache(maxsize=None)
def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the shipped table's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def triton_minor() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


@dataclass(frozen=True)
class TuneKey:
    device: str  # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" ("cpu" under the interpreter)
    triton: str  # Triton major.minor, e.g. "3.6"
    weight_format: str  # what the GEMMs read: dense, fp8_block128, mxfp4, nvfp4
    act_format: str  # dense, fp8_block128, fp8_mx32
    dtype: str  # activation dtype: bf16, fp16
    E: int
    k: int
    H: int
    I: int  # noqa: E741
    tokens: int  # token_bucket(T)

    def __post_init__(self):
        for name in ("E", "k", "H", "I", "tokens"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"TuneKey.{name}={getattr(self, name)!r} must be a positive int")
        for name in ("device", "triton", "weight_format", "act_format", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TuneKey.{name}={getattr(self, name)!r} must be a string")

    @staticmethod
    def for_call(device: torch.device, dtype: torch.dtype, num_tokens: int, E: int, k: int, H: int,
                 I: int, weight_format: str, act_format: str) -> "TuneKey":  # noqa: E741
        return _key_for(device, dtype, token_bucket(num_tokens), E, k, H, I, weight_format, act_format)


@functools.lru_cache(maxsize=4096)  # built on every fused call: hash the arguments, not the fields
def _key_for(device, dtype, bucket, E, k, H, I, weight_format, act_format) -> TuneKey:  # noqa: E741
    return TuneKey(device_name(device), triton_minor(), weight_format, act_format,
                   DTYPE_LABELS.get(dtype, str(dtype).replace("torch.", "")), E, k, H, I, bucket)


def kernel_constraint_violation(block_m: int, g1: GemmTiles, g2: GemmTiles, weight_format: str,
                                act_format: str, swap_ab: bool = False) -> Optional[str]:
    """Why templates/moe_gemm1.py / moe_gemm2.py would reject these tiles at compile time (their
    ``tl.static_assert``s and moe_common.quantize_fp8_groups), or None when they accept them.
    ``swap_ab``: the swapped FP4 tiles (the launcher would replace tiles they cannot take)."""
    if min(block_m, g1.block_n, g1.block_k, g2.block_n, g2.block_k) < 16:
        return "tl.dot needs tiles of at least 16"
    if swap_ab and g1.block_n % 64:
        return "gemm1: swapped tiles write whole 64-column K-order groups"
    if swap_ab and (g1.block_k % 64 or g2.block_k % 64):
        return "swapped FP4 tiles take 64-deep K steps (moe_tiles.weight_tile_dot)"
    for name, g in (("gemm1", g1), ("gemm2", g2)):
        if weight_format == "fp8_block128" and 128 % g.block_k:
            return f"{name}: fp8 block-128 weight scales need block_k | 128"
        if weight_format in ("mxfp4", "nvfp4") and g.block_k % 32:
            return f"{name}: fp4 scales need 32 | block_k"
        if act_format == "fp8_block128" and 128 % g.block_k:
            return f"{name}: fp8 block-128 activations need block_k | 128"
        if act_format == "fp8_mx32" and g.block_k % 32:
            return f"{name}: fp8 mx32 activations need 32 | block_k"
    group = {"fp8_block128": 128, "fp8_mx32": 32}.get(act_format)
    if group and g1.block_n % group:
        return f"gemm1: fp8 activation groups of {group} must not straddle block_n={g1.block_n}"
    return None


@dataclass(frozen=True)
class TunedTiles:
    """What the tuner chooses; applied onto the heuristic config of the actual call."""

    block_m: int  # rows per M-block (MoEKernelConfig.block_m)
    gemm1: GemmTiles  # L1 tiles
    gemm2: GemmTiles  # L2 tiles
    gate_up_one_dot: bool = True  # L1 gate/up as one wide MMA (MoEKernelConfig.gate_up_one_dot)
    swap_ab: bool = False  # swapped FP4 tiles (MoEKernelConfig.swap_ab); absent in older tables

    def __post_init__(self):
        if self.block_m not in BLOCK_M_CHOICES:
            raise ValueError(f"block_m={self.block_m} must be one of {BLOCK_M_CHOICES}")
        if not (isinstance(self.gemm1, GemmTiles) and isinstance(self.gemm2, GemmTiles)):
            raise ValueError("gemm1 and gemm2 must be GemmTiles")

    @staticmethod
    def of(cfg: MoEKernelConfig) -> "TunedTiles":
        return TunedTiles(cfg.block_m, cfg.gemm1, cfg.gemm2, cfg.gate_up_one_dot, cfg.swap_ab)

    def apply(self, cfg: MoEKernelConfig, source: str) -> MoEKernelConfig:
        return cfg.replace(block_m=self.block_m, gemm1=self.gemm1, gemm2=self.gemm2,
                           gate_up_one_dot=self.gate_up_one_dot, swap_ab=self.swap_ab, source=source,
                           tail_block_m=swap_ab_tail_block_m(self.block_m) if self.swap_ab else 0)

    def to_json(self) -> dict:
        out = {"block_m": self.block_m, "gate_up_one_dot": self.gate_up_one_dot,
               "gemm1": dataclasses.asdict(self.gemm1), "gemm2": dataclasses.asdict(self.gemm2)}
        if self.swap_ab:  # written only where set: older readers and tables stay as they were
            out["swap_ab"] = True
        return out

    @staticmethod
    def from_json(d: dict) -> "TunedTiles":
        one_dot, swap = d.get("gate_up_one_dot", True), d.get("swap_ab", False)
        for name, v in (("gate_up_one_dot", one_dot), ("swap_ab", swap)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r} must be a bool")
        return TunedTiles(_int(d["block_m"]), GemmTiles(**{f: _int(v) for f, v in d["gemm1"].items()}),
                          GemmTiles(**{f: _int(v) for f, v in d["gemm2"].items()}), one_dot, swap)

    def __str__(self):
        g1, g2 = self.gemm1, self.gemm2
        return (f"bm{self.block_m} L1 {g1.block_n}x{g1.block_k} w{g1.num_warps} s{g1.num_stages}"
                f"{'' if self.gate_up_one_dot else ' two-dot'} L2 {g2.block_n}x{g2.block_k} w{g2.num_warps} "
                f"s{g2.num_stages}{' swap' if self.swap_ab else ''}")


def _int(v) -> int:
    if type(v) is not int:
        raise ValueError(f"{v!r} is not an int")
    return v


@dataclass(frozen=True)
class TuneEntry:
    tiles: TunedTiles
    us: Optional[float] = None  # the tuned tiles' time when tuned (µs per call)
    heuristic_us: Optional[float] = None  # the heuristic's time in the same run

    def to_json(self, key: TuneKey) -> dict:
        return {"key": dataclasses.asdict(key), "tiles": self.tiles.to_json(), "us": self.us,
                "heuristic_us": self.heuristic_us}

    @staticmethod
    def from_json(d: dict) -> tuple[TuneKey, "TuneEntry"]:
        key = TuneKey(**d["key"])
        tiles = TunedTiles.from_json(d["tiles"])
        why = kernel_constraint_violation(tiles.block_m, tiles.gemm1, tiles.gemm2, key.weight_format, key.act_format)
        if why:
            raise ValueError(why)
        us, hus = d.get("us"), d.get("heuristic_us")
        return key, TuneEntry(tiles, None if us is None else float(us), None if hus is None else float(hus))


# ----------------------------------------------------------------------------- tables

_here: dict[TuneKey, Optional[TuneEntry]] = {}  # tuned in this process; None: tried, nothing ran


def read_table(path) -> dict[TuneKey, TuneEntry]:
    """Entries of one JSON table; {} for a missing or corrupt file, bad entries skipped (debug log)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        log.debug("no tuned MoE table at %s", path)
        return {}
    except (OSError, ValueError) as e:
        log.debug("ignoring unreadable tuned MoE table %s: %s", path, e)
        return {}
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("entries"), list):
        log.debug("ignoring tuned MoE table %s: not format %d", path, FILE_FORMAT)
        return {}
    table = {}
    for i, raw in enumerate(data["entries"]):
        try:
            key, entry = TuneEntry.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.debug("ignoring entry %d of %s: %s: %s", i, path, type(e).__name__, e)
            continue
        table[key] = entry
    return table


def write_table(path, table: dict[TuneKey, TuneEntry], meta: Optional[dict] = None) -> None:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [table[k].to_json(k) for k in sorted(table, key=dataclasses.astuple)]
    text = json.dumps({"format": FILE_FORMAT, "meta": meta or {}, "entries": entries}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _loaded.cache_clear()
    _found.clear()
    _bump()


@functools.lru_cache(maxsize=None)
def _loaded(path: str) -> dict[TuneKey, TuneEntry]:
    return read_table(path)


def user_cache_path() -> str:
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE


def shipped_path(device: str) -> Path:
    return SHIPPED_DIR / f"{device_slug(device)}.json"


_found: dict = {}  # (key, user cache path, shipped dir) -> lookup's answer: every fused call looks up
_generation = 0  # bumped whenever a lookup's answer may change (lowering/moe.py keys its call plans on it)


def generation() -> tuple:
    """Changes whenever ``lookup`` may answer differently: a tuning remembered, tables written or
    forgotten, another user cache or shipped directory."""
    return _generation, user_cache_path(), SHIPPED_DIR


def _bump() -> None:
    global _generation
    _generation += 1


def lookup(key: TuneKey) -> Optional[tuple[Optional[TunedTiles], str]]:
    """(tiles, source) from the first table that has the key, or None.  Tiles are None where this
    process tried to tune the bucket and nothing ran (use the heuristic, do not try again)."""
    memo = (key, user_cache_path(), SHIPPED_DIR)
    if memo not in _found:
        _found[memo] = _lookup(key)
    return _found[memo]


def _lookup(key: TuneKey) -> Optional[tuple[Optional[TunedTiles], str]]:
    if key in _here:
        entry = _here[key]
        return (entry.tiles if entry else None), "tuned"
    entry = _loaded(user_cache_path()).get(key)
    if entry is not None:
        return entry.tiles, "tuned-cache"
    entry = _loaded(str(shipped_path(key.device))).get(key)
    if entry is not None:
        return entry.tiles, "tuned-shipped"
    return None


def remember(key: TuneKey, entry: Optional[TuneEntry], persist: bool = True) -> None:
    """Keep a tuning result for this process and, when it found tiles, in the user cache file
    (merged with what the file holds now; a write failure only costs a debug log)."""
    _here[key] = entry
    _found.clear()
    _bump()
    if entry is None or not persist:
        return
    path = user_cache_path()
    try:
        table = read_table(path)
        table[key] = entry
        write_table(path, table)
    except OSError as e:
        log.debug("could not write the tuned MoE cache %s: %s", path, e)


def clear() -> None:
    """Forget this process's tuning and the tables read so far (tests)."""
    _here.clear()
    _loaded.cache_clear()
    _found.clear()
    _bump()
