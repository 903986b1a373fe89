"""The stdlib corpus: the Python standard library's source as text files, split into train and held-out files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from vffn_jax.config import ConfigError



# --------------------------------------------------------------------------- corpus


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (tests included), without site-packages, caches and build config."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts)
                  and not p.relative_to(root).parts[0].startswith("config-"))


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut at line boundaries into pieces of about `size` characters (a longer line stays whole)."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > size:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_stdlib_corpus(out_dir: Path, max_files: int | None = None, root: Path | None = None,
                        holdout_files: float = 0.02, eval_chunk_chars: int = 2048) -> tuple[Path, float]:
    """Writes (once) the standard library's source as a .jsonl corpus folder; returns (folder, the share of
    documents held out).

    Files are ordered by a hash of their relative path; the last `holdout_files` of them are held out
    (whole files: no held-out file is seen in training). Training documents are whole files, in
    `train/stdlib.jsonl`. Held-out files are cut at line boundaries into ~`eval_chunk_chars` pieces,
    shuffled (by hash), in `validation/stdlib.jsonl`: a `validation/` folder is the input's own validation
    split (vffn_jax/data/splits.py), so the first evaluation batches sample all held-out files rather than
    the first one or two. Files that are not valid UTF-8 (a few deliberate encoding tests) and empty files
    are skipped. `max_files` keeps only the first files of the hashed order (smoke tests).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    ver = f"py{sys.version_info.major}.{sys.version_info.minor}"
    name = f"stdlib-{ver}" + (f"-first{max_files}" if max_files else "") + f"-holdout{holdout_files:g}"
    path = Path(out_dir) / name
    manifest_path = path.with_name(f"{name}.manifest.json")
    if (path / "validation" / "stdlib.jsonl").is_file() and manifest_path.is_file():
        return path, json.loads(manifest_path.read_text())["holdout_fraction"]
    files = stdlib_files(root)
    files.sort(key=lambda p: _sha(str(p.relative_to(root))))
    docs, skipped = [], []
    for p in files:
        if max_files and len(docs) >= max_files:
            break
        rel = str(p.relative_to(root))
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text.strip():
            docs.append((rel, text))
    n_val_files = max(1, round(len(docs) * holdout_files))
    if len(docs) - n_val_files < 1:
        raise ConfigError(f"the corpus has {len(docs)} files: too few to hold out {n_val_files}")
    train_docs = docs[:-n_val_files]
    pieces = [(rel, i, c) for rel, text in docs[-n_val_files:] for i, c in enumerate(_chunks(text, eval_chunk_chars))]
    pieces.sort(key=lambda x: _sha(f"{x[0]}:{x[1]}"))
    n_total = len(train_docs) + len(pieces)
    fraction = len(pieces) / n_total
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, docs_of_split in (("train", [(rel, text) for rel, text in train_docs]),
                                 ("validation", [(f"{rel}#{i}", text) for rel, i, text in pieces])):
        (tmp / split).mkdir(parents=True)
        with (tmp / split / "stdlib.jsonl").open("w", encoding="utf-8") as f:
            for rel, text in docs_of_split:
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)
    manifest = {"root": str(root), "python": sys.version.split()[0], "train_files": len(train_docs),
                "train_utf8_bytes": sum(len(t.encode()) for _, t in train_docs),
                "heldout_files": [rel for rel, _ in docs[-n_val_files:]], "heldout_pieces": len(pieces),
                "heldout_utf8_bytes": sum(len(t.encode()) for _, t in docs[-n_val_files:]),
                "holdout_fraction": fraction, "skipped_not_utf8": skipped,
                "order": "files by sha256 of the relative path; held-out pieces by sha256 of path:index"}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return path, fraction
