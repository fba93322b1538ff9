"""A persistent LVLM answer cache: one sqlite file maps (scorer identity, query, ordered ICDs) -> raw generation.

Why: the LVLM is the expensive part of a real downstream sweep, and the arms of a reward sweep pick the same ICDs
for most queries. Generation is deterministic (greedy / beam search, ``do_sample=False``), so an answer computed
once can be served to every later run, process and sweep that uses the same store (docs/answer_cache.md).

Key: ``sha256(canonical JSON of [KEY_VERSION, sha256(canonical JSON of the scorer identity), split, query part,
ordered ICD ids])``. The *scorer identity* is a caller-provided dict of everything global that determines the
answer (model and weights fingerprint, prompt template, system prompt, generation settings, dtype, data files...;
:func:`scorer_identity` builds one from a scorer). The *query part* is the split, the query index and, when the
scorer has ``item()``, the question id, image id and question text.

Store: stdlib ``sqlite3`` in WAL mode with a busy timeout and retries on "database is locked"; writes are
``INSERT OR IGNORE`` in short ``BEGIN IMMEDIATE`` transactions, so several processes can insert at once. A key
always keeps its first answer; a different answer arriving later for an existing key is counted in ``conflicts``.
A file sqlite cannot read as a database is moved aside (``<name>.corrupt``) with a warning and a fresh store starts.

CLI: ``python -m leverplus.evaluation.answer_cache {info,clear} [--path P]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sqlite3
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from filelock import FileLock

from leverplus.errors import LeverPlusInputError
from leverplus.utils import default_cache_dir

log = logging.getLogger(__name__)

#: Version of the table layout; a file with another version is refused (clear it or use another path).
SCHEMA_VERSION = 1
#: Version of the key derivation; bump it when the key's content changes so old entries can never be hit.
KEY_VERSION = 1
#: File name of the default store inside the cache root.
DEFAULT_FILENAME = "answers.sqlite"
#: sqlite busy timeout (seconds): how long one statement waits for another process's write lock.
BUSY_TIMEOUT_S = 30.0
#: Attempts of one transaction that still reports "database is locked"/"busy" after the busy timeout.
LOCK_RETRIES = 8
#: First back-off between those attempts (seconds); doubled each time.
RETRY_BASE_DELAY_S = 0.05
#: Keys per ``IN (...)`` lookup and rows per write transaction: below SQLite's historical 999 host parameters,
#: and short enough that other writers are not kept waiting.
SQL_CHUNK = 500
#: Bytes read from the head and the tail of each weights file by :func:`weights_fingerprint`.
WEIGHTS_SAMPLE_BYTES = 1 << 20
#: Weight and config files that :func:`weights_fingerprint` covers.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_TEXT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.json", "chat_template.jinja")

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- keys


def _json_default(x: Any) -> Any:
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"{type(x).__name__} is not part of a canonical JSON key: {x!r}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no whitespace, no NaN: the same value always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def key_digest(obj: Any) -> str:
    """Full sha256 (hex) of :func:`canonical_json`: stricter than ``utils.stable_hash`` (no NaN, no silent
    ``str()`` of unknown types, untruncated), because a key collision would serve a wrong answer."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def prompt_key(identity_hash: str, split: str, query: Mapping[str, Any], icds: Sequence[int]) -> str:
    """The cache key of one prompt: identity digest, split, query part and the ICD ids *in prompt order*."""
    return key_digest([KEY_VERSION, identity_hash, str(split), dict(query), [int(i) for i in icds]])


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _sampled_hash(path: Path, sample: int) -> str:
    """Size plus head and tail bytes: cheap on multi-GB files, and changes whenever a checkpoint is replaced."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(size - sample)
            h.update(f.read(sample))
    return h.hexdigest()


def weights_fingerprint(model_dir: PathLike, *, sample_bytes: int = WEIGHTS_SAMPLE_BYTES) -> str:
    """A fingerprint of a model folder: full sha256 of its config/tokenizer files; for each weights file the
    Hugging Face blob name when it is a symlink into ``blobs/`` (that name *is* the content's sha256), else its
    size plus the first and last ``sample_bytes``."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise LeverPlusInputError("not a model folder", file=str(root), field="scorer.hf.model")
    parts: Dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file():
            continue
        if p.name in MODEL_TEXT_FILES:
            parts[rel] = _file_sha256(p)
        elif p.suffix in WEIGHT_SUFFIXES:
            target = p.resolve()
            parts[rel] = ("blob:" + target.name if p.is_symlink() and target.parent.name == "blobs"
                          else "sample:" + _sampled_hash(p, sample_bytes))
    if not any(k.endswith(WEIGHT_SUFFIXES) for k in parts):
        raise LeverPlusInputError("the model folder has no weights file", file=str(root),
                                  fix=f"expected files ending in {', '.join(WEIGHT_SUFFIXES)}")
    return key_digest(parts)


def _data_fingerprints(described: Mapping[str, Any]) -> Dict[str, str]:
    """sha256 of every local questions/items file named in ``describe()["eval"]`` (they define the ICD texts)."""
    out = {}
    for name, value in sorted(dict(described.get("eval") or {}).items()):
        if name.endswith("_ques_path") and isinstance(value, str) and Path(value).is_file():
            out[name] = _file_sha256(Path(value))
    return out


def scorer_identity(scorer: Any, **extra: Any) -> Dict[str, Any]:
    """A scorer identity built from the scorer itself: its class, ``describe()`` (model name, generation settings,
    prompt template, system prompt, dtype, attention implementation, data paths), the weights fingerprint and the
    torch/transformers versions when it has a ``model_dir``, the device type when it has one, the sha256 of its
    local items files, and ``extra`` (what ``describe()`` lacks, e.g. the hf scorer's min/max_pixels and
    image_root). Values must be JSON-serialisable."""
    described = scorer.describe()
    ident: Dict[str, Any] = {"class": f"{type(scorer).__module__}.{type(scorer).__qualname__}",
                             "describe": described, "data": _data_fingerprints(described)}
    model_dir = getattr(scorer, "model_dir", None)
    if model_dir is not None:
        ident["weights"] = weights_fingerprint(model_dir)
        ident["versions"] = {m: getattr(sys.modules[m], "__version__", None)
                             for m in ("torch", "transformers") if m in sys.modules}
    device = getattr(scorer, "device", None)
    if device is not None:
        ident["device"] = str(getattr(device, "type", device))
    ident.update(extra)
    canonical_json(ident)  # fail now, not at the first lookup, on a value that cannot be keyed
    return ident


# ---------------------------------------------------------------------------------------------- store


def default_path() -> Path:
    """``<cache root>/answers.sqlite`` (cache root: ``leverplus.utils.default_cache_dir()``)."""
    return default_cache_dir() / DEFAULT_FILENAME


def _is_lock_error(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    """A file that is not (or no longer) a database: "file is not a database", "database disk image is malformed".
    sqlite raises those as a plain ``DatabaseError``; locks, I/O and permission problems are its subclasses."""
    return type(e) is sqlite3.DatabaseError


def _damage_of(path: Path) -> Optional[sqlite3.DatabaseError]:
    """The damage error of an existing sqlite file whose header or schema cannot be read, else None."""
    if not path.exists():
        return None
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        if not _is_damage(e):
            raise
        return e
    finally:
        conn.close()
    return None


def _chunks(seq: Sequence[Any], n: int = SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), n):
        yield seq[start : start + n]


class AnswerCache:
    """The sqlite store: ``answers(key TEXT PRIMARY KEY, answer TEXT, created_at REAL) WITHOUT ROWID`` and
    ``meta(name TEXT PRIMARY KEY, value TEXT)`` (``schema_version``). One connection per process (reopened
    after a fork); safe for several writer processes on one file (local file systems: sqlite's WAL needs
    shared memory, so not NFS)."""

    def __init__(self, path: Optional[PathLike] = None) -> None:
        self.path = Path(path).expanduser().resolve() if path is not None else default_path()
        self.conflicts = 0  # answers that differed from the one already stored for their key (first one kept)
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1
        try:
            self._retry(self._init_schema)
        except sqlite3.DatabaseError as e:
            if not _is_damage(e):
                raise
            self._set_aside_damaged(e)
            self._retry(self._init_schema)

    # ------------------------------------------------------------------ connection
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")  # the first read of the file: a damaged one fails here
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one transaction), retrying with back-off while sqlite reports a lock."""
        delay = RETRY_BASE_DELAY_S
        for attempt in range(LOCK_RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_lock_error(e) or attempt == LOCK_RETRIES - 1:
                    raise
                conn = self._conn
                if conn is not None and conn.in_transaction:
                    conn.rollback()
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _init_schema(self) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, "
                         "created_at REAL NOT NULL) WITHOUT ROWID")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            (version,) = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        if int(version) != SCHEMA_VERSION:
            raise LeverPlusInputError(f"answer cache schema version {version}, this code reads {SCHEMA_VERSION}",
                                      file=str(self.path),
                                      fix=f"python -m leverplus.evaluation.answer_cache clear --path {self.path}, "
                                          "or use another path")

    def _set_aside_damaged(self, e: sqlite3.DatabaseError) -> None:
        """A file sqlite cannot read as a database is moved aside to ``<name>.corrupt`` (with its WAL and
        shared-memory files removed) and a fresh store starts: its answers are generated again. Under the file lock
        ``<name>.lock``, and only if the file is still unreadable, so a store another process has just started in
        its place is kept."""
        self.close()
        with FileLock(f"{self.path}.lock"):
            if _damage_of(self.path) is None:
                return
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            log.warning(f"answer cache {self.path} is not a readable sqlite database (sqlite: {e}); moved aside to "
                        f"{aside}, a fresh store is started (its answers are generated again)")
            os.replace(self.path, aside)
            for extra in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                extra.unlink(missing_ok=True)

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> Dict[str, Any]:  # picklable for worker processes: the connection is reopened
        return {"path": self.path, "conflicts": self.conflicts}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.path, self.conflicts, self._conn, self._pid = state["path"], state["conflicts"], None, -1

    # ------------------------------------------------------------------ reads and writes
    def get_many(self, keys: Sequence[str]) -> Dict[str, str]:
        """The stored answers of those ``keys`` that are present."""
        keys = list(dict.fromkeys(keys))
        found: Dict[str, str] = {}
        for chunk in _chunks(keys):
            sql = f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
            found.update(self._retry(lambda: self._connection().execute(sql, list(chunk)).fetchall()))
        return found

    def get(self, key: str) -> Optional[str]:
        return self.get_many([key]).get(key)

    def _put_chunk(self, rows: Sequence[Tuple[str, str]]) -> Tuple[int, int]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: nobody inserts between our read and our write
        try:
            sql = f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(rows))})"
            existing = dict(conn.execute(sql, [k for k, _ in rows]).fetchall())
            now = time.time()
            new = [(k, a, now) for k, a in rows if k not in existing]
            conn.executemany("INSERT OR IGNORE INTO answers (key, answer, created_at) VALUES (?, ?, ?)", new)
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return len(new), sum(1 for k, a in rows if k in existing and existing[k] != a)

    def put_many(self, items: Iterable[Tuple[str, str]]) -> int:
        """Store ``(key, answer)`` pairs; an existing key keeps its answer (a different one counts a conflict).
        Returns how many keys were new."""
        rows = list(dict((str(k), str(a)) for k, a in items).items())
        inserted = 0
        for chunk in _chunks(rows):
            n_new, n_conflicts = self._retry(lambda: self._put_chunk(chunk))
            inserted += n_new
            self.conflicts += n_conflicts
        return inserted

    # ------------------------------------------------------------------ size report and clearing
    def __len__(self) -> int:
        return int(self._retry(lambda: self._connection().execute("SELECT COUNT(*) FROM answers").fetchone()[0]))

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL and shared-memory files."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
                   if p.exists())

    def stats(self) -> Dict[str, Any]:
        """``{entries, bytes, path, conflicts}`` (conflicts: seen by this instance)."""
        return {"entries": len(self), "bytes": self.size_bytes(), "path": str(self.path),
                "conflicts": self.conflicts}

    def clear(self) -> int:
        """Delete every answer (the schema stays) and shrink the file. Returns how many were deleted."""
        def delete() -> int:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = conn.execute("DELETE FROM answers").rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.rollback()
                raise
            return n

        n = self._retry(delete)
        self._retry(lambda: self._connection().execute("VACUUM"))
        self._retry(lambda: self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        return int(n)


# ---------------------------------------------------------------------------------------------- scorer wrapper

#: Item fields that identify the query's content in its key (beyond split and index), when the scorer has ``item``.
QUERY_FIELDS = ("question_id", "image_id", "question")
#: Derived scorer methods that are re-bound to the wrapper so that their ``self.generate`` goes through the cache.
CACHED_DERIVED = ("answer", "answer_batch")


def item_query_part(scorer: Any, split: str, query_index: int) -> Dict[str, Any]:
    """The default query part of a key: split, index and, when the scorer has ``item()``, :data:`QUERY_FIELDS`."""
    part: Dict[str, Any] = {"split": str(split), "query_index": int(query_index)}
    if hasattr(scorer, "item"):
        it = scorer.item(split, int(query_index))
        part.update({f: it.get(f) for f in QUERY_FIELDS})
    return part


class CachedScorer:
    """A scorer whose ``generate`` answers from an :class:`AnswerCache` first and asks the wrapped scorer ONCE
    per call for all the misses (unique prompts, in their first-seen order); everything else is delegated.

    ``answer``/``answer_batch`` exist exactly when the wrapped scorer's class has them; they run that class's
    implementation with this wrapper as ``self`` (``Scorer.answer_batch`` calls ``self.generate``), so they are
    cached too. ``generated``/``cached`` count prompts produced by the LVLM / served by the store."""

    def __init__(self, scorer: Any, cache: AnswerCache, identity: Mapping[str, Any], *,
                 query_part: Optional[Callable[[Any, str, int], Mapping[str, Any]]] = None) -> None:
        if not callable(getattr(scorer, "generate", None)):
            raise LeverPlusInputError(f"{type(scorer).__name__} has no generate(split, query_indices, icd_lists)",
                                      field="scorer", fix="wrap a leverplus.datagen.scorers Scorer")
        self.scorer = scorer
        self.cache = cache
        self.identity = dict(identity)
        self.identity_hash = key_digest(self.identity)
        self._query_part = query_part or item_query_part
        self._query_memo: Dict[Tuple[str, int], Mapping[str, Any]] = {}
        self.generated = 0
        self.cached = 0
        self.calls = 0  # calls of the wrapped scorer's generate

    def __getattr__(self, name: str) -> Any:
        if name in ("scorer", "__getstate__", "__setstate__"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        if name in CACHED_DERIVED:
            fn = getattr(type(self.scorer), name, None)
            if fn is None:
                raise AttributeError(name)
            return types.MethodType(fn, self)
        return getattr(self.scorer, name)

    def keys(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> List[str]:
        """The cache key of every prompt."""
        out = []
        for q, icds in zip(query_indices, icd_lists):
            memo_key = (str(split), int(q))
            if memo_key not in self._query_memo:
                self._query_memo[memo_key] = self._query_part(self.scorer, split, int(q))
            out.append(prompt_key(self.identity_hash, split, self._query_memo[memo_key], icds))
        return out

    def generate(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> List[str]:
        """Raw generations, one per prompt, in order: stored ones from the cache, the rest from one batched call."""
        query_indices, icd_lists = list(query_indices), [list(x) for x in icd_lists]
        if len(query_indices) != len(icd_lists):
            raise LeverPlusInputError(f"{len(query_indices)} queries but {len(icd_lists)} ICD lists",
                                      field="icd_lists")
        keys = self.keys(split, query_indices, icd_lists)
        found = self.cache.get_many(keys)
        first_miss: Dict[str, int] = {}  # missing key -> its first position (insertion order = prompt order)
        for i, k in enumerate(keys):
            if k not in found:
                first_miss.setdefault(k, i)
        if first_miss:
            found.update(self._generate_misses(split, query_indices, icd_lists, first_miss))
        self.generated += len(first_miss)
        self.cached += len(keys) - len(first_miss)
        return [found[k] for k in keys]

    def _generate_misses(self, split: str, query_indices: List[int], icd_lists: List[List[int]],
                         first_miss: Dict[str, int]) -> Dict[str, str]:
        """One call of the wrapped scorer for the missing prompts; their answers are stored and returned."""
        idx = list(first_miss.values())
        fresh = list(self.scorer.generate(split, [query_indices[i] for i in idx], [icd_lists[i] for i in idx]))
        if len(fresh) != len(idx):
            raise LeverPlusInputError(f"the scorer returned {len(fresh)} generations for {len(idx)} prompts",
                                      field="scorer")
        self.calls += 1
        new = dict(zip(first_miss, (str(t) for t in fresh)))
        self.cache.put_many(new.items())
        return new

    def reset_stats(self) -> None:
        """Zero ``generated``/``cached``/``calls`` (e.g. between the runs of a sweep sharing one wrapper)."""
        self.generated = self.cached = self.calls = 0

    def stats(self) -> Dict[str, Any]:
        """``{generated, cached, calls, conflicts, identity_hash}`` of this wrapper (conflicts: its cache's)."""
        return {"generated": self.generated, "cached": self.cached, "calls": self.calls,
                "conflicts": self.cache.conflicts, "identity_hash": self.identity_hash}


# ---------------------------------------------------------------------------------------------- CLI


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``info``: one line with path, entries and size; ``clear``: delete every answer."""
    ap = argparse.ArgumentParser(prog="python -m leverplus.evaluation.answer_cache", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("info", "clear"))
    ap.add_argument("--path", default=None, help=f"the sqlite file (default: <cache root>/{DEFAULT_FILENAME})")
    args = ap.parse_args(argv)
    path = Path(args.path).expanduser().resolve() if args.path else default_path()
    if not path.exists():
        print(f"answer cache {path}: no file (0 answers)")
        return 0
    with AnswerCache(path) as cache:
        if args.command == "info":
            s = cache.stats()
            print(f"answer cache {s['path']}: {s['entries']} answers, {_mib(s['bytes'])}")
        else:
            n = cache.clear()
            print(f"answer cache {cache.path}: cleared {n} answers, {_mib(cache.size_bytes())} left")
    return 0


__all__ = ["AnswerCache", "CachedScorer", "canonical_json", "default_path", "item_query_part", "main", "prompt_key",
           "scorer_identity", "key_digest", "weights_fingerprint"]

if __name__ == "__main__":
    sys.exit(main())
