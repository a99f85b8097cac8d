"""Prompt sets for evaluation (ALGORITHM.md section 7): Parti-Prompts, the HPDv2 test prompts, user files.

``load_prompts(name_or_path)`` returns a list of :class:`Prompt`. Every prompt keeps its position
in the *unfiltered* set (``Prompt.index``), so a run filtered by category or cut by ``limit`` gives
each prompt the same index, hence the same seed and the same image file name, as a full run, and
two runs can be compared prompt by prompt.

Sources:

- ``parti``: Parti-Prompts (Yu et al. 2022), 1,632 prompts with their ``Category`` and
  ``Challenge``, shipped in ``smpo/prompt_sets/parti`` (Apache-2.0). The TSV is read with quoting
  off: one prompt starts with a double quote (``"G I G G L E" painted in ...``) and must stay intact.
- ``hpdv2``: the 3,200 HPDv2 test prompts (Wu et al. 2023), 800 in each style ``anime``,
  ``concept-art``, ``paintings``, ``photo`` (the category), in that order. They are the files
  ``benchmark/<style>.json`` (each a JSON list of strings) of the hub dataset ``zhwang/HPDv2``,
  downloaded with ``huggingface_hub``; a local copy of that folder is read when its path is given
  instead of the name.
- a user file: ``.txt`` (one prompt a line, blank lines skipped), ``.json`` (a list of strings or
  of objects), ``.jsonl`` (one object a line), ``.tsv`` / ``.csv`` (a header row). Objects and
  tables need a ``prompt`` field or column (``caption`` and ``text`` are accepted too); an optional
  ``category`` (and ``challenge``) field is kept.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROMPT_SETS = ("parti", "hpdv2")
HPDV2_REPO = "zhwang/HPDv2"
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
_PROMPT_KEYS = ("prompt", "caption", "text")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set.

    ``index`` is its position in the full, unfiltered set: the stable id that names its images and
    picks their seeds.
    """

    text: str
    index: int
    category: str | None = None
    challenge: str | None = None

    def __str__(self) -> str:
        return self.text


def load_prompts(name_or_path: str | os.PathLike, *, categories: Iterable[str] | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Load a prompt set by name (``parti``, ``hpdv2``) or from a file or an HPDv2 ``benchmark`` folder.

    ``categories`` keeps only prompts of those categories (case-insensitive; an unknown category is
    an error that lists the known ones); ``limit`` then keeps the first ``limit`` prompts. A source
    that holds no prompt is an error: a job would otherwise finish having made nothing.
    """
    prompts = _read_source(name_or_path)
    if not prompts:
        raise ValueError(f"{name_or_path}: the prompt source holds no prompts")
    if categories is not None:
        prompts = filter_categories(prompts, categories, source=str(name_or_path))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


def filter_categories(prompts: Sequence[Prompt], categories: Iterable[str], *, source: str = "prompts") -> list[Prompt]:
    """Prompts whose category is one of ``categories`` (compared case-insensitively)."""
    wanted = {c.strip().lower() for c in categories if c.strip()}
    known = {p.category.lower(): p.category for p in prompts if p.category is not None}
    unknown = sorted(wanted - set(known))
    if unknown:
        names = ", ".join(sorted(known.values())) or "none: this prompt set has no categories"
        raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {source}; known: {names}")
    return [p for p in prompts if p.category is not None and p.category.lower() in wanted]


def _read_source(name_or_path: str | os.PathLike) -> list[Prompt]:
    name = str(name_or_path)
    if name.lower() == "parti":
        return read_parti()
    if name.lower() == "hpdv2":
        return read_hpdv2()
    path = Path(name).expanduser()
    if path.is_dir():
        return read_hpdv2(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt set {name!r}: not one of {', '.join(PROMPT_SETS)} and no such file")
    return read_prompt_file(path)


def read_parti() -> list[Prompt]:
    """The 1,632 Parti-Prompts shipped with the package."""
    with resources.files("smpo.prompt_sets.parti").joinpath("PartiPrompts.tsv").open("r", encoding="utf-8") as f:
        return _read_table(f, delimiter="\t", source="PartiPrompts.tsv")


def read_hpdv2(folder: str | os.PathLike | None = None, *, revision: str | None = None) -> list[Prompt]:
    """The 3,200 HPDv2 test prompts from a local ``benchmark`` folder, or from the hub when ``folder`` is None."""
    prompts: list[Prompt] = []
    for style in HPDV2_STYLES:
        path = Path(folder) / f"{style}.json" if folder is not None else _download_hpdv2(style, revision)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: an HPDv2 benchmark folder holds "
                                    f"{', '.join(s + '.json' for s in HPDV2_STYLES)}")
        texts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: expected a JSON list of prompt strings")
        offset = len(prompts)
        prompts.extend(Prompt(t, offset + i, category=style) for i, t in enumerate(texts))
    return prompts


def _download_hpdv2(style: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(HPDV2_REPO, f"{style}.json", subfolder="benchmark", repo_type="dataset",
                                revision=revision))


def read_prompt_file(path: str | os.PathLike) -> list[Prompt]:
    """Prompts of a ``.txt``, ``.json``, ``.jsonl``, ``.tsv`` or ``.csv`` file (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Prompt(t, i) for i, t in enumerate(line.strip() for line in lines if line.strip())]
    if suffix == ".jsonl":
        records = []
        for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {row}: not JSON ({e})") from None
        return _from_records(records, source=str(path))
    if suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
        return _from_records(records, source=str(path))
    if suffix in (".tsv", ".csv"):
        with path.open("r", encoding="utf-8", newline="") as f:
            return _read_table(f, delimiter="\t" if suffix == ".tsv" else ",", source=str(path))
    raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .json, .jsonl, .tsv or .csv")


def _from_records(records: list, *, source: str) -> list[Prompt]:
    prompts = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            prompts.append(Prompt(record, i))
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{source}, record {i + 1}: expected a string or an object, got {type(record).__name__}")
        lower = {str(k).lower(): v for k, v in record.items()}
        key = next((k for k in _PROMPT_KEYS if k in lower), None)
        if key is None or not isinstance(lower[key], str):
            raise ValueError(f"{source}, record {i + 1}: no string field {' / '.join(_PROMPT_KEYS)}")
        prompts.append(Prompt(lower[key], i, category=_optional_str(lower.get("category")),
                              challenge=_optional_str(lower.get("challenge"))))
    return prompts


def _read_table(lines: Iterable[str], *, delimiter: str, source: str) -> list[Prompt]:
    # TSV is read with quoting off: a prompt may start with a literal quote (Parti-Prompts does).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = [h.strip().lower() for h in next(reader, [])]
    column = next((header.index(k) for k in _PROMPT_KEYS if k in header), None)
    if column is None:
        raise ValueError(f"{source}: no prompt column in the header {header}; name one of {', '.join(_PROMPT_KEYS)}")
    category = header.index("category") if "category" in header else None
    challenge = header.index("challenge") if "challenge" in header else None
    prompts = []
    for row_number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= column:
            raise ValueError(f"{source}, row {row_number}: {len(row)} cells, no prompt in column {column + 1}")
        prompts.append(Prompt(row[column], len(prompts), category=_cell(row, category),
                              challenge=_cell(row, challenge)))
    return prompts


def _cell(row: list[str], column: int | None) -> str | None:
    return _optional_str(row[column]) if column is not None and column < len(row) else None


def _optional_str(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
