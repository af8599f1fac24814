"""Write the local data files that the task YAMLs under evals/tasks/ read (nothing here needs the Hub).

    python evals/tasks/prepare_tasks.py all                  # BIG-bench + held-out corpora
    python evals/tasks/prepare_tasks.py bigbench [--sdist bigbench-1.0.0.tar.gz] [--tasks social_iqa ...]
    python evals/tasks/prepare_tasks.py heldout [--manifest PATH] [--tokenizer DIR]
    python evals/tasks/prepare_tasks.py hellaswag --file hellaswag_val.jsonl   (or a .parquet of Rowan/hellaswag)

Output goes to evals/tasks/data/ (override with --data-dir); the YAMLs name these files relative to the
repository root, so run lm_eval from there:

    lm_eval --model ouroboros --model_args pretrained=DIR --tasks ouro_bigbench,ouro_heldout --include_path evals/tasks

bigbench: the BIG-bench JSON tasks come from the PyPI sdist bigbench==1.0.0, fetched from PyPI's simple API with
  its sha256 checked, or `pip download --no-deps` (the package is never installed or imported; only task.json members are read, and
  an archive with absolute or `..` member paths is refused). Each multiple-choice example becomes one
  hellaswag-style record {"query", "choices", "label"}: query = task_prefix + "Q: " + input + "\nA:", the
  choices are the keys of target_scores (scored as continuations after a space, as lm-eval does for
  hellaswag), label = the index of the single highest score. Examples whose highest score is shared are
  skipped and counted.
heldout: the 64 x 256-token chunks of each held-out corpus (the training issue's manifest) decoded back to
  text with the tokenizer that produced them; each record also stores n_tokens = the length of the text
  re-encoded with that tokenizer (the denominator of the token_perplexity metric).
hellaswag: copies a local HellaSwag validation file (the original hellaswag_val.jsonl, or a parquet file of
  the Hub dataset) to where evals/tasks/hellaswag/hellaswag.yaml looks for it, after checking its fields.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from ouroboros_plugins.atomic import write_jsonl

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "data"
BIGBENCH_TASKS = ("social_iqa", "strategyqa", "causal_judgment", "physical_intuition")
HELDOUT_CORPORA = ("indist", "wikipedia", "reddit")
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


# ---------------------------------------------------------------------------------------------------
# BIG-bench
# ---------------------------------------------------------------------------------------------------
def read_bigbench_tasks(sdist: str | os.PathLike, names: Sequence[str]) -> dict[str, dict]:
    """The parsed `bigbench/benchmark_tasks/<name>/task.json` of each name, read from the sdist tarball."""
    from ouroboros_train.data import checked_members

    wanted = {name: None for name in names}
    with tarfile.open(sdist, "r:*") as tar:
        for member in checked_members(tar, sdist):
            parts = PurePosixPath(member.name).parts
            if len(parts) >= 3 and parts[-1] == "task.json" and parts[-3] == "benchmark_tasks" and parts[-2] in wanted:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                with handle:
                    wanted[parts[-2]] = json.load(handle)
    missing = [name for name, task in wanted.items() if task is None]
    if missing:
        raise FileNotFoundError(f"{sdist} has no benchmark_tasks/<name>/task.json for: {', '.join(missing)}")
    return wanted  # type: ignore[return-value]


def bigbench_to_hellaswag(task: dict, name: str) -> tuple[list[dict], int]:
    """(records, skipped) for one BIG-bench JSON task; see the module docstring for the format."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"BIG-bench task {name!r} has no top-level examples (tasks with subtasks are not supported)")
    prefix = task.get("task_prefix", "") or ""
    q_prefix = (task.get("example_input_prefix") or "\nQ: ").lstrip("\n")
    a_prefix = (task.get("example_output_prefix") or "\nA: ").rstrip()
    records, skipped = [], 0
    for index, example in enumerate(examples):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            skipped += 1
            continue
        choices = [str(choice).strip() for choice in scores]
        values = [float(v) for v in scores.values()]
        best = max(values)
        if values.count(best) != 1:
            skipped += 1
            continue
        records.append(
            {
                "id": f"{name}-{index}",
                "query": f"{prefix}{q_prefix}{str(example['input']).strip()}{a_prefix}",
                "choices": choices,
                "label": values.index(best),
            }
        )
    if not records:
        raise ValueError(f"BIG-bench task {name!r}: no multiple-choice example with a single best answer")
    return records, skipped


def download_bigbench_sdist(dest: Path) -> Path:
    """The ~360 MB bigbench==1.0.0 sdist in `dest` (never installed), hash-checked: `ouroboros_train.data`'s fetch."""
    from ouroboros_train.data import download_bigbench_sdist as fetch

    dest.mkdir(parents=True, exist_ok=True)
    return fetch(dest)


def prepare_bigbench(data_dir: Path, sdist: str | os.PathLike | None = None, names: Sequence[str] = BIGBENCH_TASKS) -> dict:
    work = None
    try:
        if sdist is None:
            data_dir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".bigbench-", dir=data_dir))
            sdist = download_bigbench_sdist(work)
        tasks = read_bigbench_tasks(sdist, names)
        summary = {}
        for name, task in tasks.items():
            records, skipped = bigbench_to_hellaswag(task, name)
            write_jsonl(data_dir / "bigbench" / f"{name}.jsonl", records)
            summary[name] = {"examples": len(records), "skipped": skipped}
        return summary
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# held-out corpora (perplexity)
# ---------------------------------------------------------------------------------------------------
def heldout_records(chunks, tokenizer, corpus: str) -> tuple[list[dict], int]:
    """(records, exact) for one corpus: decoded chunks, and how many re-encode to exactly the same ids."""
    records, exact = [], 0
    for index, row in enumerate(chunks.tolist()):
        text = tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        exact += int(again == row)
        records.append({"id": f"{corpus}-{index}", "corpus": corpus, "text": text, "n_tokens": len(again)})
    return records, exact


def prepare_heldout(data_dir: Path, manifest: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    from transformers import AutoTokenizer

    from ouroboros_train.data import default_manifest_path, load_heldout_manifest, tokenizer_sha256
    from ouroboros_train.default_model import default_model_dir

    manifest = Path(manifest) if manifest is not None else default_manifest_path()
    chunks, meta = load_heldout_manifest(manifest)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir) if tokenizer_dir is not None else str(default_model_dir()))
    expected = (meta.get("tokenizer") or {}).get("sha256")
    actual = tokenizer_sha256(tokenizer)
    if expected and actual is not None and actual != expected:
        raise ValueError(f"{manifest} was tokenized with another tokenizer (sha256 {expected[:12]}..., this one {actual[:12]}...)")
    summary = {}
    for corpus in HELDOUT_CORPORA:
        if corpus not in chunks:
            raise ValueError(f"{manifest} has no {corpus!r} corpus (has {sorted(chunks)})")
        records, exact = heldout_records(chunks[corpus], tokenizer, corpus)
        write_jsonl(data_dir / "heldout" / f"{corpus}.jsonl", records)
        summary[corpus] = {"chunks": len(records), "exact_roundtrip": exact, "tokens": sum(r["n_tokens"] for r in records)}
    return summary


# ---------------------------------------------------------------------------------------------------
# HellaSwag from a local file
# ---------------------------------------------------------------------------------------------------
def read_hellaswag(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no HellaSwag file at {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no records")
    for number, row in enumerate(rows, 1):
        missing = [name for name in HELLASWAG_FIELDS if name not in row]
        if missing:
            raise ValueError(f"{path}: record {number} lacks {missing}; expected HellaSwag fields {list(HELLASWAG_FIELDS)}")
        if row["label"] in ("", None):
            raise ValueError(f"{path}: record {number} has no label (the HellaSwag test split is unlabelled; use validation)")
    return rows


def prepare_hellaswag(data_dir: Path, source: str | os.PathLike) -> dict:
    rows = read_hellaswag(source)
    count = write_jsonl(data_dir / "hellaswag" / "hellaswag_val.jsonl", rows)
    return {"hellaswag": {"examples": count}}


# ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"output folder (default {DEFAULT_DATA_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("bigbench", "all"):
        p = sub.add_parser(name)
        p.add_argument("--sdist", help="an already downloaded bigbench-1.0.0.tar.gz (default: pip download it)")
        p.add_argument("--tasks", nargs="+", default=list(BIGBENCH_TASKS), help="BIG-bench JSON task names")
        if name == "all":
            p.add_argument("--manifest", help="held-out manifest (default: the training issue's cache)")
            p.add_argument("--tokenizer", help="tokenizer directory (default: the default model)")
    p = sub.add_parser("heldout")
    p.add_argument("--manifest", help="held-out manifest (default: $OUROBOROS_CACHE/data/heldout_manifest.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the default model's)")
    p = sub.add_parser("hellaswag")
    p.add_argument("--file", required=True, help="hellaswag_val.jsonl, or a validation .parquet of the Hub dataset")
    args = parser.parse_args(argv)

    data_dir = args.data_dir.resolve()
    summary = {}
    if args.command in ("bigbench", "all"):
        summary.update(prepare_bigbench(data_dir, args.sdist, args.tasks))
    if args.command in ("heldout", "all"):
        summary.update(prepare_heldout(data_dir, args.manifest, args.tokenizer))
    if args.command == "hellaswag":
        summary.update(prepare_hellaswag(data_dir, args.file))
    print(json.dumps({"data_dir": str(data_dir), "written": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
