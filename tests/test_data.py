"""The held-out protocol and corpora logic, offline: fake `_sources` trees, a fake tokenizer, fake models."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile

import pytest
import torch
from safetensors import safe_open

from ouroboros_train import data

EOS = 2
BOS = 1


class CharTokenizer:
    """One id per character; adds a BOS only if asked, so a wrong `add_special_tokens` shows."""

    name_or_path = "fake-char"
    eos_token_id = EOS

    def __len__(self):
        return 300

    def encode_one(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 290) for c in text]
        return ([BOS] if add_special_tokens else []) + ids

    def __call__(self, texts, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": self.encode_one(texts, add_special_tokens)}
        return {"input_ids": [self.encode_one(t, add_special_tokens) for t in texts]}


def text_for(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop\nqrstuvwxyz.,") for _ in range(n))


def make_sources(root, names, chars=200):
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text_for(i, chars + i), encoding="utf-8")
    return root


def squad_json(contexts):
    # two articles, contexts spread over them, duplicates included
    half = len(contexts) // 2
    return {
        "version": "1.0",
        "data": [
            {"title": "a", "paragraphs": [{"context": c, "qas": []} for c in contexts[:half]]},
            {"title": "b", "paragraphs": [{"context": c, "qas": []} for c in contexts[half:]]},
        ],
    }


# ---------------------------------------------------------------- file listing / split


def test_list_source_files_sorted_by_relative_posix_path(tmp_path):
    # posix-string order: '-' < '.' < '/'; Path-object order would put "a/b" before "a-b"
    names = ["a/b.rst.txt", "a.rst.txt", "a-b.rst.txt", "Z.rst.txt", "c/d/e.rst.txt", "c/d.rst.txt"]
    make_sources(tmp_path, names)
    (tmp_path / "ignored.txt").write_text("x")
    (tmp_path / "ignored.rst").write_text("x")
    files = data.list_source_files(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == ["Z.rst.txt", "a-b.rst.txt", "a.rst.txt", "a/b.rst.txt", "c/d.rst.txt", "c/d/e.rst.txt"]


def test_list_source_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.list_source_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="no \\*.rst.txt"):
        data.list_source_files(tmp_path)


def test_split_heldout_every_tenth_of_497():
    files = [f"f{i:03d}" for i in range(497)]
    train, held = data.split_heldout(files)
    assert held == files[::10]
    assert len(held) == 50 and len(train) == 447
    assert held[0] == "f000" and held[-1] == "f490"
    assert set(train) | set(held) == set(files) and not set(train) & set(held)
    assert train == [f for f in files if f not in set(held)]  # order kept


# ---------------------------------------------------------------- chunking / sampling


def test_chunk_stream_drops_tail_non_overlapping():
    t = torch.arange(1000)
    c = data.chunk_stream(t, 256)
    assert c.shape == (3, 256) and c.dtype == torch.long
    assert torch.equal(c.reshape(-1), torch.arange(768))
    assert data.chunk_stream(list(range(255)), 256).shape == (0, 256)


@pytest.mark.parametrize("n", [64, 65, 960, 1028, 1515, 5000])
def test_select_chunk_indices_matches_random_sample(n):
    idx = data.select_chunk_indices(n)
    assert idx == sorted(random.Random(0).sample(range(n), 64))
    assert len(idx) == 64 and len(set(idx)) == 64 and idx == sorted(idx)
    assert data.select_chunk_indices(n) == idx  # deterministic


def test_select_chunk_indices_pinned_values():
    # values of the published runs (960 / 1028 chunks); pinned against accidental protocol drift
    assert data.select_chunk_indices(960)[:6] == [14, 41, 63, 75, 97, 101]
    assert data.select_chunk_indices(1028)[:6] == [2, 28, 67, 82, 127, 128]


def test_sample_chunks_picks_the_selected_rows():
    stream = torch.randint(0, 50, (256 * 100 + 17,), generator=torch.Generator().manual_seed(0))
    chunks, idx = data.sample_chunks(stream)
    assert chunks.shape == (64, 256) and chunks.dtype == torch.long
    assert idx == sorted(random.Random(0).sample(range(100), 64))
    for row, i in zip(chunks, idx):
        assert torch.equal(row, stream[i * 256 : (i + 1) * 256])


def test_too_small_corpus_message():
    with pytest.raises(ValueError, match=r"wiki: corpus too small: found 16383 tokens, need at least 16384"):
        data.sample_chunks(torch.zeros(64 * 256 - 1, dtype=torch.long), "wiki")
    with pytest.raises(ValueError, match="found 0 tokens"):
        data.sample_chunks([], "empty")
    chunks, idx = data.sample_chunks(torch.arange(64 * 256))  # exactly enough
    assert idx == list(range(64)) and torch.equal(chunks.reshape(-1), torch.arange(64 * 256))


# ---------------------------------------------------------------- streams


def test_tokenize_documents_eos_after_each_no_special_tokens():
    tok = CharTokenizer()
    assert data.tokenize_documents(tok, ["ab", "", "c"]) == [3 + 97, 3 + 98, EOS, EOS, 3 + 99, EOS]


def test_squad_contexts_unique_in_file_order(tmp_path):
    obj = squad_json(["x", "y", "x", "z", "y", "w"])
    assert data.squad_contexts(obj) == ["x", "y", "z", "w"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(obj))
    assert data.squad_contexts(p) == ["x", "y", "z", "w"]
    with pytest.raises(ValueError, match="SQuAD"):
        data.squad_contexts({"nope": []})


@pytest.fixture
def fake_corpora(tmp_path):
    names = [f"dir{i % 3}/doc{i:02d}.rst.txt" for i in range(31)] + ["about.rst.txt", "zz.rst.txt"]
    src = make_sources(tmp_path / "_sources", names, chars=6000)
    squad = {}
    for k, (name, seed) in {"wikipedia": ("new_wiki_v1.0.json", 100), "reddit": ("reddit_v1.0.json", 200)}.items():
        ctxs = [text_for(seed + i, 700) for i in range(30)]
        ctxs.insert(5, ctxs[2])  # a duplicate that must be dropped
        p = tmp_path / name
        p.write_text(json.dumps(squad_json(ctxs)))
        squad[k] = p
    return src, squad


def test_build_heldout_chunks_protocol(fake_corpora):
    src, squad = fake_corpora
    tok = CharTokenizer()
    chunks, meta = data.build_heldout_chunks(tok, src, squad)
    assert list(chunks) == ["indist", "wikipedia", "reddit"]

    rel = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.rst.txt"))
    held = rel[::10]
    assert meta["corpora"]["indist"]["sources"] == held
    expected = []
    for r in held:
        expected += tok.encode_one((src / r).read_text(), add_special_tokens=False) + [EOS]
    n = len(expected) // 256
    idx = sorted(random.Random(0).sample(range(n), 64))
    want = torch.tensor(expected[: n * 256]).reshape(n, 256)[idx]
    assert torch.equal(chunks["indist"], want)
    assert meta["corpora"]["indist"]["chunk_indices"] == idx
    assert meta["corpora"]["indist"]["n_tokens"] == len(expected)

    for k in ("wikipedia", "reddit"):
        ctxs = data.squad_contexts(squad[k])
        assert len(ctxs) == 30
        stream = tok.encode_one("\n\n".join(ctxs), add_special_tokens=False)
        n = len(stream) // 256
        idx = sorted(random.Random(0).sample(range(n), 64))
        assert torch.equal(chunks[k], torch.tensor(stream[: n * 256]).reshape(n, 256)[idx])
        assert meta["corpora"][k]["n_texts"] == 30
    assert all(c.shape == (64, 256) and c.dtype == torch.long for c in chunks.values())
    assert meta["tokenizer"]["name_or_path"] == "fake-char" and meta["tokenizer"]["len"] == 300


def test_build_heldout_chunks_small_corpus_fails_before_writing(fake_corpora, tmp_path):
    src, squad = fake_corpora
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(squad_json(["short text"] * 3)))
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"wikipedia: corpus too small: found 10 tokens, need at least 16384"):
        data.build_heldout_manifest(CharTokenizer(), out, sources_dir=src, squad_files={**squad, "wikipedia": tiny})
    assert not out.exists()
    with pytest.raises(ValueError, match="missing"):
        data.build_heldout_chunks(CharTokenizer(), src, {"reddit": squad["reddit"]})


def test_manifest_round_trip(fake_corpora, tmp_path):
    src, squad = fake_corpora
    out = tmp_path / "sub" / "manifest.safetensors"
    p = data.build_heldout_manifest(CharTokenizer(), out, sources_dir=src, squad_files=squad)
    assert p == out and out.is_file()
    assert [q.name for q in out.parent.iterdir()] == ["manifest.safetensors"]  # no temp files left
    chunks, meta = data.load_heldout_manifest(out)
    want_chunks, want_meta = data.build_heldout_chunks(CharTokenizer(), src, squad)
    assert set(chunks) == set(want_chunks)
    for k in want_chunks:
        assert chunks[k].dtype == torch.int64 and torch.equal(chunks[k], want_chunks[k])
    assert meta == json.loads(json.dumps(want_meta))
    with safe_open(str(out), framework="pt") as f:  # a plain safetensors file
        assert sorted(f.keys()) == ["indist", "reddit", "wikipedia"]


def test_load_manifest_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        data.load_heldout_manifest(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a held-out manifest"):
        data.load_heldout_manifest(other)


def test_training_token_stream_and_cache(fake_corpora, tmp_path):
    src, _ = fake_corpora
    tok = CharTokenizer()
    cache = tmp_path / "cache"
    s = data.training_token_stream(tok, sources_dir=src, cache_dir=cache)
    files = data.list_source_files(src)
    train = [f for i, f in enumerate(files) if i % 10]
    expected = []
    for f in train:
        expected += tok.encode_one(f.read_text(), add_special_tokens=False) + [EOS]
    assert s.dtype == torch.long and s.dim() == 1
    assert s.tolist() == expected
    cached = list((cache / "tokens").iterdir())
    assert [c.name for c in cached] == ["python_docs_train_vocab300.safetensors"]
    # second call is served from the cache: the sources are no longer needed
    s2 = data.training_token_stream(tok, sources_dir=tmp_path / "gone", cache_dir=cache)
    assert torch.equal(s, s2)


def test_training_token_cache_is_not_served_to_another_tokenizer_of_the_same_size(tmp_path):
    """The cache file is named by vocabulary size only; a tokenizer that splits text differently must re-tokenize."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def word_tokenizer(swap: bool):
        words = [f"w{i}" for i in range(4, 96)]
        if swap:
            words[0], words[1] = words[1], words[0]
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i for i, w in enumerate(words, start=4)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # d0 is held out; training text starts with d1
        (src / f"d{i}.rst.txt").write_text("w4 w5 w6 " * (i + 1), encoding="utf-8")
    first, second = word_tokenizer(False), word_tokenizer(True)
    assert len(first) == len(second)
    assert data.tokenizer_sha256(first) != data.tokenizer_sha256(second)
    assert data.tokenizer_sha256(first) == data.tokenizer_sha256(word_tokenizer(False))
    cache = tmp_path / "cache"
    a = data.training_token_stream(first, sources_dir=src, cache_dir=cache)
    b = data.training_token_stream(second, sources_dir=src, cache_dir=cache)
    assert a.tolist()[:3] == [4, 5, 6] and b.tolist()[:3] == [5, 4, 6]
    assert torch.equal(data.training_token_stream(second, sources_dir=tmp_path / "gone", cache_dir=cache), b)


# ---------------------------------------------------------------- sdist extraction


def _tar_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_extract_squad_shifts(tmp_path):
    base = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/"
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    _tar_with(sdist, {
        base + "new_wiki_v1.0.json": b'{"data": []}',
        base + "reddit_v1.0.json": b'{"data": [1]}',
        base + "nyt_v1.0.json": b"{}",
        "bigbench-1.0.0/setup.py": b"",
    })
    got = data.extract_squad_shifts(sdist, tmp_path / "out")
    assert got["wikipedia"].read_bytes() == b'{"data": []}'
    assert got["reddit"].read_bytes() == b'{"data": [1]}'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new_wiki_v1.0.json", "reddit_v1.0.json"]

    evil = tmp_path / "evil.tar.gz"
    _tar_with(evil, {base + "new_wiki_v1.0.json": b"{}", "../escape.json": b"{}"})
    with pytest.raises(ValueError, match="unsafe"):
        data.extract_squad_shifts(evil, tmp_path / "out2")
    assert not (tmp_path / "escape.json").exists()

    partial = tmp_path / "partial.tar.gz"
    _tar_with(partial, {base + "reddit_v1.0.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="new_wiki_v1.0.json"):
        data.extract_squad_shifts(partial, tmp_path / "out3")


# ---------------------------------------------------------------- metric


def bigram_model(vocab=7, seed=0, dtype=torch.float32):
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def fn(ids):
        assert not torch.is_grad_enabled()
        return table[ids]

    return fn, table


def test_heldout_nll_matches_hand_computation():
    fn, table = bigram_model()
    chunks = torch.randint(0, 7, (5, 6), generator=torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    for row in chunks.tolist():
        for a, b in zip(row[:-1], row[1:]):
            logits = table[a].tolist()
            lse = math.log(sum(math.exp(x) for x in logits))
            total += lse - logits[b]
            count += 1
    hand = total / count
    assert count == 5 * 5
    for bs in (1, 2, 3, 8):
        assert data.heldout_nll(fn, chunks, batch_size=bs) == pytest.approx(hand, rel=1e-6, abs=1e-6)


def test_heldout_nll_fp32_from_half_logits():
    fn, table = bigram_model(dtype=torch.bfloat16)
    chunks = torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(2))
    logits = table[chunks].float()
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), chunks[:, 1:].reshape(-1)).item()
    assert data.heldout_nll(fn, chunks, batch_size=3) == pytest.approx(want, rel=1e-6)


def test_heldout_nll_bad_input():
    fn, _ = bigram_model()
    with pytest.raises(ValueError, match="2-D"):
        data.heldout_nll(fn, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        data.heldout_nll(fn, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=">= 2 tokens"):
        data.heldout_nll(fn, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        data.heldout_nll(fn, torch.zeros(2, 4, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="logits of shape"):
        data.heldout_nll(lambda ids: torch.zeros(ids.shape[0], 7), torch.zeros(2, 4, dtype=torch.long))


def test_sdist_link_checks_the_published_hash():
    page = {"files": [{"filename": "bigbench-0.0.1.tar.gz", "url": "old", "hashes": {"sha256": "0" * 64}},
                      {"filename": "bigbench-1.0.0.tar.gz", "url": "../../packages/b.tar.gz", "hashes": {"sha256": "a" * 64}}]}
    assert data.sdist_link(page, "bigbench-1.0.0.tar.gz", "a" * 64) == "../../packages/b.tar.gz"
    with pytest.raises(RuntimeError, match="publishes sha256 a+ for bigbench-1.0.0.tar.gz, expected b+"):
        data.sdist_link(page, "bigbench-1.0.0.tar.gz", "b" * 64)
    with pytest.raises(RuntimeError, match="bigbench-2.0.tar.gz is not listed"):
        data.sdist_link(page, "bigbench-2.0.tar.gz", "a" * 64)


def test_download_verified_keeps_only_a_matching_file(tmp_path):
    import hashlib

    src = tmp_path / "src.tar.gz"
    src.write_bytes(b"sdist bytes" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    out = data.download_verified(src.as_uri(), tmp_path / "a.tar.gz", good)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(RuntimeError, match="does not match the expected"):
        data.download_verified(src.as_uri(), tmp_path / "b.tar.gz", "f" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "src.tar.gz"]  # nothing half-written
