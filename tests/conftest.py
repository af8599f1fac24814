"""Tiny random models built from configs (no downloads). head_dim = 32 so vLLM's CPU backend can serve them."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ("llama", "qwen2")


def tiny_config(arch: str, attn: str = "sdpa", layers: int = 6, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(**common)
    config._attn_implementation = attn
    return config


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa", dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, attn, **overrides), attn_implementation=attn)
    return model.to(dtype).eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def ouro_config(**overrides):
    from ouroboros_peft import OuroborosConfig

    kw = dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3, r=8)
    kw.update(overrides)
    return OuroborosConfig(**kw)


def randomize_adapter(model, seed: int = 1, scale: float = 0.05):
    """Move the zero-initialised heads/tables off zero so the modulation is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ouroboros_adapter." in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: '<pad>' 0, '<s>' 1, '</s>' 2, '<unk>' 3, 'w4'..'w95'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, 96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_base(path, arch: str, seed: int = 0, **overrides):
    """A tiny base model directory with tokenizer, as a user would have on disk."""
    model = tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def load_script(name: str, path: Path):
    """Import a script under evals/ (not a package) as a module, to test its own logic."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_word_text(path, n_words: int = 3000, seed: int = 0):
    """A training text in the tiny tokenizer's words (w4..w95), every third word "w7": a little structure so the
    loss can fall."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(4, 96)}" for _ in range(n_words)]
    path.write_text(" ".join(w if i % 3 else "w7" for i, w in enumerate(words)))
    return path


def random_manifest(path, n_chunks: int, seq_len: int, seed: int = 0):
    """A held-out manifest of random word ids (4..95) for the three corpora; returns its path and the chunks."""
    from ouroboros_train.data import write_heldout_manifest

    g = torch.Generator().manual_seed(seed)
    chunks = {c: torch.randint(4, 96, (n_chunks, seq_len), generator=g) for c in ("indist", "wikipedia", "reddit")}
    return write_heldout_manifest(chunks, {"protocol": {"n_chunks": n_chunks}}, path), chunks


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when the machine's cores are busy (100x slowdowns).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama base model folder with tokenizer."""
    path = tmp_path_factory.mktemp("base")
    save_base(path, "llama")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A training text in the tiny tokenizer's words."""
    return write_word_text(tmp_path_factory.mktemp("text") / "corpus.txt")
