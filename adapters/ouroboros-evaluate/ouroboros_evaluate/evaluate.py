"""Held-out evaluation of Ouroboros arms against the full and the pruned model: `evaluate()` or `ouroboros eval`.

Arms
    full        the unmodified base model
    pruned      prelude + the recurrent layer once + coda, untrained, no gate or step norm (the plain pretrained
                layers run through the host model itself with the removed layers taken out)
    <trained>   any Ouroboros adapter: conventionally `static`, `controller`, `no_gate` (more are allowed); or a
                pruned_lora run (`ouroboros train --method pruned_lora`): the same kept layers as `pruned` with a
                standard PEFT LoRA, scored as the pruned stack it was trained as

Metric: mean next-token NLL over the held-out manifest's chunks (`data.heldout_nll`), perplexity = exp(NLL),
gap recovery = (L_pruned - L_arm) / (L_pruned - L_full) per corpus.

Outputs in the evaluation folder
    results.json   exactly {"model", "arms": {ARM: {"trainable_params", "train_tokens", "heldout": {CORPUS: {"nll", "gap_recovery"}}}}}
    details.json   everything else: perplexities, chunks used, timings, training summaries, per-step diagnostics
    results.md     the markdown table
    loss_curves.png, recurrence.png   (when matplotlib is installed: the `plots` extra)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ouroboros_plugins.atomic import atomic_path, write_json, write_text

from ouroboros_train.data import CORPORA, cache_root, default_manifest_path, heldout_nll, load_heldout_manifest
from ouroboros_train.train import load_base, peak_rss_mb, read_log

__all__ = [
    "ARM_ORDER",
    "gap_recovery",
    "pruned_layers",
    "pruned_plan",
    "resolve_arm",
    "adapter_diagnostics",
    "evaluate",
    "markdown_table",
    "write_plots",
]

ARM_ORDER = ("full", "pruned", "static", "controller", "no_gate")


def gap_recovery(l_pruned: float, l_arm: float, l_full: float) -> float:
    """(L_pruned - L_arm) / (L_pruned - L_full): 0 = no better than the pruned model, 1 = as good as the full one."""
    gap = l_pruned - l_full
    if gap == 0:
        raise ValueError("the pruned and the full model score the same; gap recovery is undefined")
    return (l_pruned - l_arm) / gap


@contextlib.contextmanager
def pruned_layers(model, indices: Sequence[int]):
    """Temporarily keep only the decoder layers `indices` (in that order) of a transformers causal LM, so its
    own forward runs exactly those pretrained layers. Use without a KV cache."""
    from ouroboros_plugins import find_backbone

    backbone = find_backbone(model.config.model_type)
    decoder = backbone.decoder(model)
    original = decoder.layers
    decoder.layers = nn.ModuleList([original[i] for i in indices])
    try:
        yield model
    finally:
        decoder.layers = original


def pruned_plan(model, adapter_config: Mapping):
    """The layer plan an adapter config describes, resolved against `model` (no adapter is built)."""
    from ouroboros_plugins import OuroborosSpec, find_backbone, plan_for

    fields = {k: adapter_config[k] for k in OuroborosSpec.__dataclass_fields__ if k in adapter_config}
    backbone = find_backbone(model.config.model_type)
    return plan_for(backbone, model.config, backbone.decoder(model), OuroborosSpec(**fields))


def resolve_arm(path) -> dict:
    """A training run folder (with adapter/ and summary.json) or a bare adapter folder -> what evaluation needs."""
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        run, adapter = p, p / "adapter"
    elif (p / "adapter_config.json").is_file():
        run, adapter = (p.parent if (p.parent / "summary.json").is_file() else None), p
    else:
        raise FileNotFoundError(f"{p} is neither a training run folder (with adapter/) nor an adapter folder (with adapter_config.json)")
    from ouroboros_train.pruned import is_pruned_lora, read_stack_record

    kind = "ouroboros"
    if is_pruned_lora(adapter):  # the practitioner's baseline: a LoRA adapter plus the kept layers
        kind = "pruned_lora"
        plan = read_stack_record(adapter)["plan"]
        try:
            peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{adapter / 'adapter_config.json'} is not a readable JSON object ({exc})") from None
        if peft_type != "LORA":
            raise ValueError(f"{adapter / 'adapter_config.json'}: a pruned_lora adapter has peft_type 'LORA', this one {peft_type!r}")
        if not (adapter / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors")
        # the split, for the shared pruned reference (r 1: the reference plan checks no rank)
        config = {"num_prelude_layers": plan.num_prelude_layers, "num_coda_layers": plan.num_coda_layers,
                  "recurrent_layer_index": plan.recurrent_layer_index, "r": 1}
    else:
        from ouroboros_peft.config import read_adapter_config

        config = read_adapter_config(adapter)  # valid JSON, peft_type "OUROBOROS", a safetensors weights file: else named
    summary = json.loads((run / "summary.json").read_text()) if run is not None and (run / "summary.json").is_file() else {}
    return {"adapter_dir": adapter, "run_dir": run, "config": config, "summary": summary, "kind": kind,
            "log": read_log(run) if run is not None else []}


def _split_key(config: Mapping) -> tuple:
    fp = config.get("base_fingerprint") or {}
    rec = config.get("recurrent_layer_index")
    return (config["num_prelude_layers"], config["num_coda_layers"], rec if rec is not None else fp.get("recurrent_layer_index"))


@torch.no_grad()
def adapter_diagnostics(peft_model, chunks: torch.Tensor, batch_size: int = 4) -> dict:
    """Per recurrence step, averaged over every token of `chunks`: the gate's retention 1 - g (absent without a
    gate) and the L2 norm of the modulation vector (all targets concatenated, before the alpha/r scale)."""
    wrapper = peft_model.base_model.model.model
    name = wrapper.active_ouroboros()
    adapter = wrapper.ouroboros_adapter[name]
    sums = {"modulation_norm": defaultdict(float), "gate_retention": defaultdict(float)}
    counts = {"modulation_norm": defaultdict(int), "gate_retention": defaultdict(int)}
    current = {"step": 0}
    original = adapter.modulation

    def modulation(pooled, step):  # OuroborosAdapter.modulation(pooled, step); pooled is None for static modulation
        m = original(pooled, step)
        current["step"] = step
        lead = pooled.shape[:-1] if pooled is not None else ()  # static: one vector per step, the same for every token
        parts = [v.float().expand(*lead, v.shape[-1]) for v in m.values()]
        norms = torch.cat(parts, dim=-1).norm(dim=-1)
        sums["modulation_norm"][step] += float(norms.sum())
        counts["modulation_norm"][step] += norms.numel()
        return m

    def gate_hook(module, inputs, output):
        retention = 1.0 - output.float()
        sums["gate_retention"][current["step"]] += float(retention.mean(-1).sum())
        counts["gate_retention"][current["step"]] += retention[..., 0].numel()

    adapter.modulation = modulation
    hook = adapter.gate.register_forward_hook(gate_hook) if hasattr(adapter, "gate") else None
    try:
        for start in range(0, chunks.shape[0], batch_size):
            peft_model(input_ids=chunks[start : start + batch_size].to(torch.long))
    finally:
        del adapter.modulation
        if hook is not None:
            hook.remove()
    out = {}
    for key in sums:
        steps = sorted(sums[key])
        out[key] = [sums[key][s] / counts[key][s] for s in steps] if steps else None
    return out


def _logits_fn(model):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def _eval_corpora(model, chunks: Mapping[str, torch.Tensor], label: str, progress: bool) -> tuple[dict, float]:
    out, t0 = {}, time.perf_counter()
    for corpus, c in chunks.items():
        t = time.perf_counter()
        out[corpus] = heldout_nll(_logits_fn(model), c, batch_size=8)
        if progress:
            print(f"[eval] {label:<12} {corpus:<10} nll {out[corpus]:.4f}  ({time.perf_counter() - t:.0f}s, {c.shape[0]} chunks)",
                  file=sys.stderr, flush=True)
    return out, time.perf_counter() - t0


def _reference_key(base_dir: Path, split: tuple, chunks: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update((base_dir / "config.json").read_bytes())
    for w in sorted(base_dir.glob("*.safetensors")):
        st = w.stat()
        digest.update(f"{w.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    digest.update(repr(split).encode())
    for corpus in sorted(chunks):
        digest.update(corpus.encode())
        digest.update(chunks[corpus].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def _arm_key(reference_key: str, adapter_dir: Path, diagnostics_chunks: int) -> str:
    """The reference key (model, split, exact tokens) + the adapter's exact bytes (config and weights)."""
    digest = hashlib.sha256(f"{reference_key}:{diagnostics_chunks}".encode())
    for f in [adapter_dir / "adapter_config.json"] + sorted(adapter_dir.glob("*.safetensors")) + sorted(adapter_dir.glob("pruned_stack.json")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:24]


def _check_request(arms: Mapping[str, str], out_dir: Path, corpora: Sequence[str], n_chunks: int, manifest: Optional[str],
                   overwrite: bool) -> tuple:
    """Every check on the request before any model is loaded: (resolved arms, chunks per corpus, manifest path, its meta)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace its results")
    bad = [a for a in arms if a in ("full", "pruned")]
    if bad:
        raise ValueError(f"arm names {bad} are reserved for the reference arms")
    if not arms:
        raise ValueError("give at least one trained arm (NAME=RUN_DIR)")
    resolved = {name: resolve_arm(path) for name, path in arms.items()}
    splits = {name: _split_key(r["config"]) for name, r in resolved.items()}
    if len(set(splits.values())) != 1:
        raise ValueError(f"all arms must share one split (prelude, coda, recurrent layer) to share a pruned baseline: {splits}")
    manifest_path = Path(manifest) if manifest else default_manifest_path()
    all_chunks, manifest_meta = load_heldout_manifest(manifest_path)
    missing = [c for c in corpora if c not in all_chunks]
    if missing:
        raise ValueError(f"held-out manifest {manifest_path} has no corpora {missing}; it has {sorted(all_chunks)}")
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    return resolved, {c: all_chunks[c][:n_chunks] for c in corpora}, manifest_path, manifest_meta


def _reference_nlls(model, layer_ids, chunks, ref_file: Optional[Path], meta: dict, progress: bool) -> tuple:
    """NLLs and seconds of `full` and `pruned`: from `ref_file` when it is given and there, else computed (and
    written to `ref_file` when given). Returns (nll, timing, reused)."""
    if ref_file is not None and ref_file.is_file():
        cached = json.loads(ref_file.read_text())
        if progress:
            print(f"[eval] full and pruned NLLs reused from {ref_file} (computed earlier on the same tokens)", file=sys.stderr)
        return {k: cached[k] for k in ("full", "pruned")}, {k: cached["timing"][k] for k in ("full", "pruned")}, True
    nll, timing = {}, {}
    nll["full"], timing["full"] = _eval_corpora(model, chunks, "full", progress)
    with pruned_layers(model, layer_ids):
        nll["pruned"], timing["pruned"] = _eval_corpora(model, chunks, "pruned", progress)
    if ref_file is not None:
        write_json(ref_file, {"full": nll["full"], "pruned": nll["pruned"], "timing": timing, **meta}, sort_keys=True)
    return nll, timing, False


def _arm_nlls(name: str, r: dict, base: str, model, chunks, arm_file: Optional[Path], diagnostics_chunks: int,
              n_chunks: int, progress: bool) -> tuple:
    """One trained arm: {"nll", "eval_seconds", "trainable_params"[, "diagnostics"]} and whether it was reused.
    `model` is a clean base (or None: one is loaded); it gets the adapter, so it is not clean afterwards."""
    from peft import PeftModel

    if arm_file is not None and arm_file.is_file():
        if progress:
            print(f"[eval] {name}: NLLs reused from {arm_file} (this adapter, scored earlier on the same tokens)", file=sys.stderr)
        return json.loads(arm_file.read_text()), True
    if model is None:
        model, _, _ = load_base(base)
    if r.get("kind") == "pruned_lora":
        from ouroboros_train.pruned import load_pruned_lora, lora_trainable_params

        peft_model = load_pruned_lora(model, r["adapter_dir"])  # runs the kept layers with their LoRA
        hit = {"trainable_params": lora_trainable_params(peft_model)}
        hit["nll"], hit["eval_seconds"] = _eval_corpora(peft_model, chunks, name, progress)
        if arm_file is not None:
            write_json(arm_file, {**hit, "adapter": str(r["adapter_dir"]), "n_chunks": n_chunks}, sort_keys=True)
        return hit, False
    peft_model = PeftModel.from_pretrained(model, str(r["adapter_dir"]))
    peft_model.eval()
    adapter = peft_model.base_model.model.model.ouroboros_adapter["default"]
    hit = {"trainable_params": sum(p.numel() for p in adapter.parameters())}
    hit["nll"], hit["eval_seconds"] = _eval_corpora(peft_model, chunks, name, progress)
    if diagnostics_chunks:
        src = chunks["indist"] if "indist" in chunks else next(iter(chunks.values()))
        hit["diagnostics"] = adapter_diagnostics(peft_model, src[:diagnostics_chunks])
    if arm_file is not None:
        write_json(arm_file, {**hit, "adapter": str(r["adapter_dir"]), "n_chunks": n_chunks}, sort_keys=True)
    return hit, False


def evaluate(
    base: str,
    arms: Mapping[str, str],
    out: str,
    *,
    corpora: Sequence[str] = CORPORA,
    n_chunks: int = 64,
    manifest: Optional[str] = None,
    overwrite: bool = False,
    reuse_reference: bool = False,
    reuse_arms: bool = False,
    diagnostics_chunks: int = 4,
    plots: bool = True,
    progress: bool = True,
    extra_details: Optional[dict] = None,
) -> dict:
    """Evaluate `full`, `pruned` and every trained arm (`arms[name] = run or adapter folder`) on the first
    `n_chunks` chunks of each held-out corpus; write the outputs listed in the module docstring into `out`.

    reuse_reference: keep the full/pruned NLLs in `<cache>/evals/` keyed by model, split and exact tokens, and
    reuse them when they are there (they do not depend on training).
    reuse_arms: the same for each trained arm, keyed also by the adapter's exact bytes (config and weights), so
    evaluating an experiment again scores only the arms that are new or changed."""
    import ouroboros_peft  # noqa: F401  (registers the PEFT type)

    out_dir = Path(out)
    resolved, chunks, manifest_path, manifest_meta = _check_request(arms, out_dir, corpora, n_chunks, manifest, overwrite)

    t_start = time.perf_counter()
    model, _, base_dir = load_base(base)
    model.eval()
    vocab = model.config.vocab_size
    for c, t in chunks.items():
        if int(t.max()) >= vocab:
            raise ValueError(f"held-out corpus {c!r} has token ids >= the model's vocab ({vocab}): built with another tokenizer?")
    plan = pruned_plan(model, next(iter(resolved.values()))["config"])
    split = (len(plan.prelude), plan.recurrent, len(plan.coda))

    reference_key = _reference_key(base_dir, split, chunks)
    cache_dir = cache_root() / "evals"
    ref_file = cache_dir / f"reference-{reference_key}.json" if reuse_reference else None
    nll, timing, reference_reused = _reference_nlls(
        model, plan.prelude + (plan.recurrent,) + plan.coda, chunks, ref_file,
        {"base": str(base_dir), "split": list(split), "n_chunks": n_chunks}, progress)
    diag: dict[str, dict] = {}
    params: dict[str, int] = {"full": 0, "pruned": 0}
    arms_reused = []
    for name, r in resolved.items():
        # hashing the adapter's bytes only when the cache is in use
        arm_file = cache_dir / f"arm-{_arm_key(reference_key, r['adapter_dir'], diagnostics_chunks)}.json" if reuse_arms else None
        hit, reused = _arm_nlls(name, r, base, model, chunks, arm_file, diagnostics_chunks, n_chunks, progress)
        nll[name], timing[name], params[name] = hit["nll"], hit["eval_seconds"], hit["trainable_params"]
        if "diagnostics" in hit:
            diag[name] = hit["diagnostics"]
        if reused:
            arms_reused.append(name)
        else:
            model = None  # the base now carries this adapter: load a clean one for the next arm

    arm_names = ["full", "pruned"] + list(resolved)
    results = {"model": base_dir.name, "arms": {}}  # the model folder's name; its full path is in details.json
    for name in arm_names:
        train_tokens = int(resolved[name]["summary"].get("train_tokens", 0)) if name in resolved else 0
        results["arms"][name] = {
            "trainable_params": int(params[name]),
            "train_tokens": train_tokens,
            "heldout": {
                c: {"nll": float(nll[name][c]), "gap_recovery": float(gap_recovery(nll["pruned"][c], nll[name][c], nll["full"][c]))}
                for c in corpora
            },
        }
    details = {
        "base_dir": str(base_dir),
        "split": {"prelude": list(plan.prelude), "recurrent": plan.recurrent, "coda": list(plan.coda)},
        "manifest": str(manifest_path),
        "n_chunks": n_chunks,
        "chunk_len": int(next(iter(chunks.values())).shape[1]),
        "full_protocol": n_chunks >= int(manifest_meta.get("protocol", {}).get("n_chunks", 64)),
        "perplexity": {a: {c: math.exp(nll[a][c]) for c in corpora} for a in arm_names},
        "eval_seconds": timing,
        "reference_reused": reference_reused,
        "arms_reused": arms_reused,
        "training": {name: r["summary"] for name, r in resolved.items()},
        "arm_paths": {name: str(arms[name]) for name in resolved},
        "diagnostics": diag,
        "eval_wall_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        **(extra_details or {}),
    }
    _write_outputs(out_dir, results, details, resolved, diag, plots)
    return results


def _write_outputs(out_dir: Path, results: dict, details: dict, resolved, diag, plots: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "details.json", details)
    write_text(out_dir / "results.md", markdown_table(results, details))
    if plots:
        details["plots"] = write_plots(out_dir, resolved, results, diag)
        write_json(out_dir / "details.json", details)


def markdown_table(results: dict, details: Optional[dict] = None) -> str:
    arms = results["arms"]
    corpora = list(next(iter(arms.values()))["heldout"])
    head = "| arm | trainable params | train tokens | " + " | ".join(f"{c} NLL (ppl) | {c} gap rec." for c in corpora) + " |"
    sep = "|---|---:|---:|" + "---:|---:|" * len(corpora)
    rows = [head, sep]
    for name, a in arms.items():
        cells = []
        for c in corpora:
            h = a["heldout"][c]
            cells.append(f"{h['nll']:.3f} ({math.exp(h['nll']):.1f})")
            cells.append(f"{100 * h['gap_recovery']:.1f} %")
        rows.append(f"| {name} | {a['trainable_params']:,} | {a['train_tokens']:,} | " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n"
    if details:
        note = f"\nHeld-out chunks per corpus: {details['n_chunks']} x {details['chunk_len']} tokens"
        if not details.get("full_protocol", True):
            note += " (a reduced subset: the first chunks of the 64-chunk protocol)"
        text += note + ".\n"
    return text


def write_plots(out_dir: Path, resolved: Mapping[str, dict], results: dict, diag: Mapping[str, dict]) -> list:
    """loss_curves.png (train loss and periodic held-out NLL against training tokens, per arm) and recurrence.png
    (gate retention and modulation norm per recurrence step). Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[eval] matplotlib is not installed (pip install 'ouroboros-evaluate[plots]'): no plots written", file=sys.stderr)
        return []
    written = []
    corpora = list(next(iter(results["arms"].values()))["heldout"])
    fig, axes = plt.subplots(1, 1 + len(corpora), figsize=(4.5 * (1 + len(corpora)), 3.6), squeeze=False)
    axes = axes[0]
    for name, r in resolved.items():
        train = [x for x in r["log"] if x.get("kind") == "train"]
        if train:
            xs = [x["tokens"] for x in train]
            ys = [x["loss"] for x in train]
            k = max(1, len(ys) // 40)
            smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            (line,) = axes[0].plot(xs, smooth, label=name)
            evals = [x for x in r["log"] if x.get("kind") == "eval"]
            for ax, c in zip(axes[1:], corpora):
                pts = [(x["tokens"], x["heldout"][c]) for x in evals if c in x["heldout"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=line.get_color(), label=f"{name} (during training)")
                ax.axhline(results["arms"][name]["heldout"][c]["nll"], color=line.get_color(), ls=":", lw=1)
    axes[0].set_title("training loss (smoothed)")
    axes[0].set_xlabel("training tokens")
    axes[0].set_ylabel("next-token NLL")
    axes[0].legend(fontsize=8)
    max_tokens = max((x["tokens"] for r in resolved.values() for x in r["log"] if x.get("kind") == "train"), default=0)
    for ax, c in zip(axes[1:], corpora):
        if max_tokens:
            ax.set_xlim(0, max_tokens * 1.05)
        for ref, style in (("full", "--"), ("pruned", "-.")):
            ax.axhline(results["arms"][ref]["heldout"][c]["nll"], color="gray", ls=style, lw=1, label=ref)
        ax.set_title(f"held-out {c} (dotted: after training)")
        ax.set_xlabel("training tokens")
        ax.legend(fontsize=7)
    written.append(_save_figure(plt, fig, out_dir / "loss_curves.png"))

    if diag:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, d in diag.items():
            if d.get("gate_retention"):
                axes[0].plot(range(1, len(d["gate_retention"]) + 1), d["gate_retention"], marker="o", label=name)
            if d.get("modulation_norm"):
                axes[1].plot(range(1, len(d["modulation_norm"]) + 1), d["modulation_norm"], marker="o", label=name)
        axes[0].set_title("gate retention 1 - g (mean over tokens)")
        axes[1].set_title("modulation norm ||m_t|| (mean over tokens)")
        for ax in axes:
            ax.set_xlabel("recurrence step")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=8)
        written.append(_save_figure(plt, fig, out_dir / "recurrence.png"))
    return written


def _save_figure(plt, fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path.name
