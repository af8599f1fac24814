"""Corpora and the held-out evaluation protocol.

Training text
    The reST sources of the Python 3.11 documentation, as shipped by the Debian
    package ``python3.11-doc`` (``.../html/_sources/**/*.rst.txt``).

Held-out protocol (exact; numbers must compare with published anchors)
    * ``files`` = every ``*.rst.txt`` under ``_sources``, sorted by relative
      POSIX path; held out = ``files[::10]``, the rest is training text.
    * Documentation streams: each file tokenized with
      ``add_special_tokens=False``, the EOS id appended after every file.
    * Out-of-distribution streams (evaluation only): the SQuAD-shifts
      ``new_wiki_v1.0.json`` / ``reddit_v1.0.json`` files from the
      ``bigbench==1.0.0`` sdist; the unique ``context`` strings in file order,
      joined with ``"\\n\\n"`` and tokenized as one text.
    * Every stream is cut into non-overlapping 256-token chunks (tail dropped)
      and ``sorted(random.Random(0).sample(range(n_chunks), 64))`` picks the
      chunks.
    * Metric: mean next-token cross entropy over all 64 x 255 predictions, fp32.

The functions that touch the network or the system (``apt-get``, ``pip
download``) are kept apart from the pure logic, which works offline on any
token lists / folders and is what the tests exercise.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ouroboros_plugins.atomic import atomic_path

__all__ = [
    "CHUNK_LEN",
    "N_CHUNKS",
    "SEED",
    "HELDOUT_STRIDE",
    "CORPORA",
    "SQUAD_SHIFTS_FILES",
    "cache_root",
    "data_cache_dir",
    "default_manifest_path",
    "fetch_python_docs",
    "fetch_squad_shifts",
    "extract_squad_shifts",
    "list_source_files",
    "split_heldout",
    "read_documents",
    "tokenize_documents",
    "squad_contexts",
    "tokenize_text",
    "chunk_stream",
    "select_chunk_indices",
    "sample_chunks",
    "build_heldout_chunks",
    "build_heldout_manifest",
    "write_heldout_manifest",
    "load_heldout_manifest",
    "training_token_stream",
    "heldout_nll",
]

CHUNK_LEN = 256
N_CHUNKS = 64
SEED = 0
HELDOUT_STRIDE = 10
CORPORA = ("indist", "wikipedia", "reddit")

DOCS_PACKAGE = "python3.11-doc"
SYSTEM_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
BIGBENCH_REQ = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
# sha256 PyPI publishes for that file (checked whichever way it is downloaded)
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI_SIMPLE = "https://pypi.org/simple"
SQUAD_SHIFTS_FILES = {"wikipedia": "new_wiki_v1.0.json", "reddit": "reddit_v1.0.json"}
MANIFEST_META_KEY = "ouroboros_heldout"
MANIFEST_FORMAT = 1
TOKENS_FORMAT = 1


# --------------------------------------------------------------------------
# cache locations
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """``$OUROBOROS_CACHE`` or ``~/.cache/ouroboros``."""
    env = os.environ.get("OUROBOROS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ouroboros"


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the corpora and token caches live: ``<cache root>/data``."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "data"


def default_manifest_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return data_cache_dir(cache_dir) / "heldout_manifest.safetensors"


# --------------------------------------------------------------------------
# network / system IO (kept small; not exercised by the offline tests)
# --------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)


def _find_sources_dir(root: Path) -> Path | None:
    """The real (non-symlinked) ``html/_sources`` folder under ``root``."""
    for cand in sorted(root.rglob("_sources")):
        if cand.is_dir() and not cand.is_symlink() and cand.parent.name == "html":
            if any(cand.rglob("*.rst.txt")):
                return cand
    return None


def fetch_python_docs(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the ``_sources`` folder of the Python 3.11 docs, fetching it once.

    Uses a system copy at ``/usr/share/doc/python3.11/html/_sources`` when there
    is one; otherwise ``apt-get download python3.11-doc`` (no install, no root
    needed unless ``apt-get update`` has to run) and ``dpkg-deb -x``; only the
    ``_sources`` folder is kept, as ``<data cache>/python3.11-doc/_sources``.
    """
    if SYSTEM_SOURCES.is_dir() and any(SYSTEM_SOURCES.rglob("*.rst.txt")):
        return SYSTEM_SOURCES
    base = data_cache_dir(cache_dir) / DOCS_PACKAGE
    tree = base / "_sources"
    if tree.is_dir() and any(tree.rglob("*.rst.txt")):
        return tree
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"Python docs sources not found at {SYSTEM_SOURCES} and `{tool}` is not available to fetch "
                f"the Debian package {DOCS_PACKAGE!r}. On Debian/Ubuntu run `apt-get install {DOCS_PACKAGE}`, "
                f"or pass `sources_dir=` pointing at an html/_sources folder."
            )
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=base))
    try:
        res = _run(["apt-get", "download", DOCS_PACKAGE], cwd=work)
        if res.returncode != 0:
            upd = _run(["apt-get", "update"])
            res = _run(["apt-get", "download", DOCS_PACKAGE], cwd=work)
            if res.returncode != 0:
                raise RuntimeError(
                    f"`apt-get download {DOCS_PACKAGE}` failed (after `apt-get update`, rc={upd.returncode}):\n"
                    f"{res.stderr.strip() or upd.stderr.strip()}"
                )
        debs = sorted(work.glob(f"{DOCS_PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"`apt-get download {DOCS_PACKAGE}` left no .deb in {work}")
        extract = work / "root"
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(extract)])
        if res.returncode != 0:
            raise RuntimeError(f"`dpkg-deb -x {debs[0].name}` failed:\n{res.stderr.strip()}")
        found = _find_sources_dir(extract)
        if found is None:
            raise RuntimeError(f"{debs[0].name} holds no html/_sources/*.rst.txt")
        # Keep only the reST sources (~12 MB of the ~100 MB package) and the package's name.
        (found / ".package").write_text(debs[0].name + "\n")
        try:
            os.rename(found, tree)
        except OSError:
            if not tree.is_dir():  # anything but losing a race with another process
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree


def _safe_member_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    if not p.parts or p.is_absolute() or ".." in p.parts:
        return False
    return ":" not in p.parts[0]  # no Windows drive letters


def checked_members(tar: tarfile.TarFile, name: str | os.PathLike) -> list[tarfile.TarInfo]:
    """Every member of ``tar``, refusing the archive ``name`` if any has an absolute, ``..`` or drive-letter path."""
    members = tar.getmembers()
    bad = [m.name for m in members if not _safe_member_name(m.name)]
    if bad:
        raise ValueError(f"refusing {name}: unsafe member paths {bad[:3]}")
    return members


def extract_squad_shifts(sdist: str | os.PathLike, dest: str | os.PathLike) -> dict[str, Path]:
    """Copy the two SQuAD-shifts JSON files out of a bigbench sdist tarball.

    Members are read with ``extractfile`` (nothing else is unpacked); the
    archive is refused if any member has an absolute or ``..`` path.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {v: k for k, v in SQUAD_SHIFTS_FILES.items()}
    found: dict[str, Path] = {}
    with tarfile.open(sdist, "r:*") as tar:
        for m in checked_members(tar, sdist):
            base = PurePosixPath(m.name).name
            parts = PurePosixPath(m.name).parts
            if base in wanted and "squad_shifts" in parts and m.isfile():
                fh = tar.extractfile(m)
                assert fh is not None
                out = dest / base
                with atomic_path(out) as tmp, fh, open(tmp, "wb") as f:
                    shutil.copyfileobj(fh, f)
                found[wanted[base]] = out
    missing = sorted(set(SQUAD_SHIFTS_FILES) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{sdist} has no squad_shifts/{', '.join(SQUAD_SHIFTS_FILES[k] for k in missing)}"
        )
    return {k: found[k] for k in SQUAD_SHIFTS_FILES}


def sdist_link(index_page: Mapping, filename: str, sha256: str) -> str:
    """The download URL of ``filename`` in a PEP 691 (JSON) simple-index page, after checking that the index
    publishes the expected sha256 for it."""
    for entry in index_page.get("files", []):
        if entry.get("filename") == filename:
            published = (entry.get("hashes") or {}).get("sha256")
            if published != sha256:
                raise RuntimeError(f"the index publishes sha256 {published} for {filename}, expected {sha256}")
            return entry["url"]
    raise RuntimeError(f"{filename} is not listed by the index")


def download_verified(url: str, dest: Path, sha256: str, timeout: float = 180.0) -> Path:
    """Stream ``url`` to ``dest`` (via a temporary name) and keep it only if its sha256 matches."""
    import urllib.request

    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:  # a failed download or a wrong checksum leaves no file behind
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    return dest


def _sdist_from_index(work: Path) -> Path:
    """bigbench's sdist straight from the package index (PEP 691 JSON simple API). Needed because recent pip
    (>= 25) refuses to download it at all: its metadata declares a direct-URL dependency."""
    import urllib.parse
    import urllib.request

    index = os.environ.get("OUROBOROS_PYPI_SIMPLE", PYPI_SIMPLE).rstrip("/")
    page_url = f"{index}/bigbench/"
    request = urllib.request.Request(page_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        page = json.loads(response.read().decode("utf-8"))
    url = urllib.parse.urljoin(page_url, sdist_link(page, BIGBENCH_SDIST, BIGBENCH_SDIST_SHA256))
    return download_verified(url, work / BIGBENCH_SDIST, BIGBENCH_SDIST_SHA256)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_bigbench_sdist(work: str | os.PathLike) -> Path:
    """The ``bigbench==1.0.0`` sdist (~360 MB; never installed) in folder ``work``: from the package index's simple
    API ($OUROBOROS_PYPI_SIMPLE, default PyPI), or else ``pip download --no-deps`` (pip < 25, or a configured
    mirror). Either way its sha256 must be the one PyPI publishes."""
    work = Path(work)
    errors = []
    try:
        return _sdist_from_index(work)
    except Exception as exc:  # network, index or hash problem: say so, then try pip
        errors.append(f"package index: {exc}")
    attempts = [
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BIGBENCH_REQ, "-d", str(work)],
        [sys.executable, "-m", "pip", "download", "--no-deps", BIGBENCH_REQ, "-d", str(work)],
    ]
    for cmd in attempts:
        res = _run(cmd)
        found = sorted(work.glob("bigbench-*.tar.gz"))
        if found and _sha256_file(found[0]) == BIGBENCH_SDIST_SHA256:
            return found[0]
        detail = f"{found[0].name} has the wrong sha256" if found else (res.stderr or res.stdout).strip()[-2000:]
        errors.append(f"$ {' '.join(cmd[2:])}\n{detail}")
    raise RuntimeError(f"could not download the {BIGBENCH_REQ} sdist:\n" + "\n".join(errors))


def fetch_squad_shifts(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Return ``{"wikipedia": path, "reddit": path}``, downloading once: the two JSON files of the bigbench sdist
    (`download_bigbench_sdist`) are copied into ``<data cache>/squad_shifts/`` and the tarball is deleted."""
    dest = data_cache_dir(cache_dir) / "squad_shifts"
    paths = {k: dest / v for k, v in SQUAD_SHIFTS_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    try:
        try:
            sdist = download_bigbench_sdist(work)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n(needed for the SQuAD-shifts eval corpora)") from exc
        extract_squad_shifts(sdist, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------
# pure logic
# --------------------------------------------------------------------------


def list_source_files(sources_dir: str | os.PathLike) -> list[Path]:
    """Every ``*.rst.txt`` under ``sources_dir``, sorted by relative POSIX path."""
    root = Path(sources_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"documentation sources folder not found: {root}")
    files = [p for p in root.rglob("*.rst.txt") if p.is_file()]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no *.rst.txt files under {root}")
    return files


def split_heldout(files: Sequence, stride: int = HELDOUT_STRIDE) -> tuple[list, list]:
    """``(train, heldout)`` with ``heldout = files[::stride]`` (order kept)."""
    if stride < 2:
        raise ValueError(f"stride must be >= 2, got {stride}")
    files = list(files)
    heldout = files[::stride]
    train = [f for i, f in enumerate(files) if i % stride != 0]
    return train, heldout


def read_documents(files: Iterable[str | os.PathLike]) -> list[str]:
    return [Path(f).read_text(encoding="utf-8") for f in files]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; the documentation streams need one to join files")
    return int(eos)


def _encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in out]


def tokenize_documents(tokenizer, texts: Sequence[str], eos_id: int | None = None) -> list[int]:
    """Each text tokenized (no special tokens), EOS appended after every one."""
    eos = _eos_id(tokenizer) if eos_id is None else int(eos_id)
    stream: list[int] = []
    for ids in _encode_batch(tokenizer, texts):
        stream.extend(ids)
        stream.append(eos)
    return stream


def squad_contexts(data: Mapping | str | os.PathLike) -> list[str]:
    """Unique ``context`` strings of a SQuAD-format file (or parsed dict), first-seen order."""
    if not isinstance(data, Mapping):
        with open(data, encoding="utf-8") as f:
            data = json.load(f)
    if "data" not in data:
        raise ValueError("not a SQuAD-format file: no top-level 'data'")
    seen: set[str] = set()
    out: list[str] = []
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            ctx = para["context"]
            if ctx not in seen:
                seen.add(ctx)
                out.append(ctx)
    return out


def tokenize_text(tokenizer, text: str) -> list[int]:
    return _encode_batch(tokenizer, [text])[0]


def _as_long_1d(tokens) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long) if not isinstance(tokens, torch.Tensor) else tokens
    if t.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.long)


def chunk_stream(tokens, chunk_len: int = CHUNK_LEN) -> torch.Tensor:
    """Non-overlapping ``[n_chunks, chunk_len]`` chunks of a 1-D stream (tail dropped)."""
    if chunk_len < 2:
        raise ValueError(f"chunk_len must be >= 2, got {chunk_len}")
    t = _as_long_1d(tokens)
    n = t.numel() // chunk_len
    return t[: n * chunk_len].reshape(n, chunk_len)


def select_chunk_indices(n_chunks: int, k: int = N_CHUNKS, seed: int = SEED) -> list[int]:
    """``sorted(random.Random(seed).sample(range(n_chunks), k))``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_chunks < k:
        raise ValueError(f"need at least {k} chunks to sample from, got {n_chunks}")
    return sorted(random.Random(seed).sample(range(n_chunks), k))


def sample_chunks(
    tokens, name: str = "corpus", chunk_len: int = CHUNK_LEN, k: int = N_CHUNKS, seed: int = SEED
) -> tuple[torch.Tensor, list[int]]:
    """The protocol's ``k`` chunks of a stream: ``(chunks [k, chunk_len], indices)``."""
    t = _as_long_1d(tokens)
    need = k * chunk_len
    if t.numel() < need:
        raise ValueError(
            f"{name}: corpus too small: found {t.numel()} tokens, need at least {need} "
            f"({k} chunks x {chunk_len} tokens)"
        )
    chunks = chunk_stream(t, chunk_len)
    idx = select_chunk_indices(chunks.shape[0], k, seed)
    return chunks[idx].clone(), idx


def tokenizer_sha256(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's serialised form (vocabulary, merges, normalisation): two tokenizers with the same
    value split every text the same way. None for a tokenizer without a serialisable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    except Exception:  # pragma: no cover - informational only
        return None


def _tokenizer_info(tokenizer) -> dict:
    info = {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0),
        "len": int(len(tokenizer)) if hasattr(tokenizer, "__len__") else None,
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
    }
    digest = tokenizer_sha256(tokenizer)
    if digest is not None:
        info["sha256"] = digest
    return info


def build_heldout_chunks(
    tokenizer,
    sources_dir: str | os.PathLike,
    squad_files: Mapping[str, str | os.PathLike],
) -> tuple[dict[str, torch.Tensor], dict]:
    """The three corpora's chunks and their provenance (no IO besides reading the inputs)."""
    missing = [k for k in SQUAD_SHIFTS_FILES if k not in squad_files]
    if missing:
        raise ValueError(f"squad_files is missing {missing}; expected keys {list(SQUAD_SHIFTS_FILES)}")
    root = Path(sources_dir)
    files = list_source_files(root)
    _, held = split_heldout(files)
    eos = _eos_id(tokenizer)
    streams: dict[str, list[int]] = {
        "indist": tokenize_documents(tokenizer, read_documents(held), eos),
    }
    sources: dict[str, list[str]] = {"indist": [p.relative_to(root).as_posix() for p in held]}
    n_texts: dict[str, int] = {"indist": len(held)}
    for name in SQUAD_SHIFTS_FILES:
        ctxs = squad_contexts(squad_files[name])
        if not ctxs:
            raise ValueError(f"{name}: {squad_files[name]} holds no contexts")
        streams[name] = tokenize_text(tokenizer, "\n\n".join(ctxs))
        sources[name] = [Path(squad_files[name]).name]
        n_texts[name] = len(ctxs)
    chunks: dict[str, torch.Tensor] = {}
    corpora_meta: dict[str, dict] = {}
    for name in CORPORA:
        c, idx = sample_chunks(streams[name], name)
        chunks[name] = c
        corpora_meta[name] = {
            "sources": sources[name],
            "n_texts": n_texts[name],
            "n_tokens": len(streams[name]),
            "n_chunks_total": len(streams[name]) // CHUNK_LEN,
            "chunk_indices": idx,
        }
    meta = {
        "format": MANIFEST_FORMAT,
        "protocol": {
            "chunk_len": CHUNK_LEN,
            "n_chunks": N_CHUNKS,
            "seed": SEED,
            "heldout": f"sorted(*.rst.txt)[::{HELDOUT_STRIDE}]",
            "n_source_files": len(files),
        },
        "tokenizer": _tokenizer_info(tokenizer),
        "corpora": corpora_meta,
    }
    return chunks, meta


def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_heldout_manifest(chunks: Mapping[str, torch.Tensor], meta: dict, out_path: str | os.PathLike) -> Path:
    """Write chunks + JSON metadata to a safetensors file atomically."""
    for name, c in chunks.items():
        if c.dim() != 2 or c.dtype != torch.long:
            raise ValueError(f"{name}: expected a 2-D int64 tensor, got {c.dtype} {tuple(c.shape)}")
    out = Path(out_path)
    _save_safetensors_atomic(dict(chunks), out, {MANIFEST_META_KEY: json.dumps(meta, sort_keys=True)})
    return out


def build_heldout_manifest(
    tokenizer,
    out_path: str | os.PathLike | None = None,
    *,
    sources_dir: str | os.PathLike | None = None,
    squad_files: Mapping[str, str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Build the held-out manifest: one int64 ``[64, 256]`` tensor per corpus.

    ``sources_dir`` / ``squad_files`` default to the fetched corpora (network
    on first use); ``out_path`` defaults to ``<data cache>/heldout_manifest.safetensors``.
    """
    if sources_dir is None:
        sources_dir = fetch_python_docs(cache_dir)
    if squad_files is None:
        squad_files = fetch_squad_shifts(cache_dir)
    chunks, meta = build_heldout_chunks(tokenizer, sources_dir, squad_files)
    out = Path(out_path) if out_path is not None else default_manifest_path(cache_dir)
    return write_heldout_manifest(chunks, meta, out)


def load_heldout_manifest(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(chunks, metadata)`` from a manifest written by :func:`build_heldout_manifest`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"held-out manifest not found: {p} (build it with build_heldout_manifest)")
    with safe_open(str(p), framework="pt") as f:
        raw = (f.metadata() or {}).get(MANIFEST_META_KEY)
        if raw is None:
            raise ValueError(f"{p} is not a held-out manifest (no {MANIFEST_META_KEY!r} metadata)")
        chunks = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    return chunks, meta


def training_token_stream(
    tokenizer,
    *,
    sources_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """The 447 training files tokenized (EOS after each) as a 1-D LongTensor.

    Cached as ``<data cache>/tokens/python_docs_train_vocab{V}.safetensors``.
    """
    from safetensors import safe_open

    vocab = int(len(tokenizer))
    eos = _eos_id(tokenizer)
    fingerprint = tokenizer_sha256(tokenizer) or ""
    cache_file = data_cache_dir(cache_dir) / "tokens" / f"python_docs_train_vocab{vocab}.safetensors"
    if use_cache and cache_file.is_file():
        with safe_open(str(cache_file), framework="pt") as f:
            meta = f.metadata() or {}
            same_tok = meta.get("tokenizer_sha256", "") == fingerprint
            if meta.get("format") == str(TOKENS_FORMAT) and meta.get("eos_token_id") == str(eos) and same_tok:
                return f.get_tensor("tokens")
    if sources_dir is None:
        sources_dir = fetch_python_docs(cache_dir)
    root = Path(sources_dir)
    files = list_source_files(root)
    train, _ = split_heldout(files)
    if not train:
        raise ValueError(f"no training files left under {root} after holding out every {HELDOUT_STRIDE}th")
    stream = torch.tensor(tokenize_documents(tokenizer, read_documents(train), eos), dtype=torch.long)
    if use_cache:
        _save_safetensors_atomic(
            {"tokens": stream},
            cache_file,
            {
                "format": str(TOKENS_FORMAT),
                "n_files": str(len(train)),
                "vocab": str(vocab),
                "eos_token_id": str(eos),
                "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
                "tokenizer_sha256": fingerprint,
            },
        )
    return stream


# --------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------


def heldout_nll(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    chunks: torch.Tensor,
    batch_size: int = 8,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Mean next-token NLL (nats) of ``model_fn`` over every prediction in ``chunks``.

    ``model_fn(input_ids [b, L]) -> logits [b, L, V]``; the loss is
    ``CE(logits[:, :-1], ids[:, 1:])`` in fp32, averaged over all ``N*(L-1)``
    predictions, under ``torch.no_grad``.
    """
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2:
        raise ValueError(f"chunks must be a 2-D tensor [n, len], got {getattr(chunks, 'shape', type(chunks))}")
    if chunks.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"chunks must hold integer token ids, got {chunks.dtype}")
    n, length = chunks.shape
    if n < 1 or length < 2:
        raise ValueError(f"chunks need at least 1 row of >= 2 tokens, got shape {(n, length)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = chunks[start : start + batch_size].to(torch.long)
            if device is not None:
                ids = ids.to(device)
            logits = model_fn(ids)
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise ValueError(
                    f"model_fn returned logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}"
                )
            pred = logits[:, :-1].float()
            tgt = ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum"
            )
            total += loss.double().cpu()
            count += tgt.numel()
    return float(total / count)
