"""Evaluation and calibration text: WikiText-2 as the usual recipes read it, and user-given text."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SWSC_HF_DATA"
TEST_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
CALIBRATION_FILE = Path("wikitext-2-tokens") / "wiki.valid.tokens"


def data_root() -> Path | None:
    """The shared WikiText-2 folder: $SWSC_HF_DATA, else ../shared/data beside the repository or the cwd."""
    candidates = [os.environ.get(DATA_ENV)]
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / TEST_FILE).is_file():
            return Path(candidate)
    return None


def rows_from_lines(text: str) -> list[str]:
    """Rows as the HF `datasets` split has them: a non-blank line keeps its newline, a blank line is ""."""
    return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]


def join_rows(rows: list[str]) -> str:
    """The usual WikiText-2 perplexity recipe: "\\n\\n".join(dataset["text"])."""
    return "\n\n".join(rows)


def wikitext2_test_text(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 raw test split joined as the usual recipe does (local copy, else `datasets`)."""
    if path is None:
        root = data_root()
        if root is None:
            return join_rows(_load_wikitext_split("test"))
        path = root / TEST_FILE
    return join_rows(rows_from_lines(Path(path).read_text(encoding="utf-8")))


def wikitext2_calibration_rows() -> list[str]:
    """WikiText-2 text for calibration, disjoint from the test split (validation here, train via `datasets`)."""
    root = data_root()
    if root is not None and (root / CALIBRATION_FILE).is_file():
        return [row for row in rows_from_lines((root / CALIBRATION_FILE).read_text(encoding="utf-8")) if row]
    return [row for row in _load_wikitext_split("train") if row]


def _load_wikitext_split(split: str) -> list[str]:
    """A split of WikiText-2 raw through `datasets` (downloaded), as rows."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise FileNotFoundError(
            f"WikiText-2 was not found locally (set {DATA_ENV} to a folder holding {TEST_FILE}) and the `datasets` "
            "package is not installed to download it (pip install datasets)"
        ) from err
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def calibration_texts(dataset: str | list[str]) -> list[str]:
    """Calibration rows from a list of strings, a text file path, or the name "wikitext2"."""
    if isinstance(dataset, list):
        if not dataset or not all(isinstance(row, str) for row in dataset):
            raise ValueError("SWSCConfig.dataset as a list must be a non-empty list of strings")
        return dataset
    if dataset == "wikitext2":
        return wikitext2_calibration_rows()
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f'SWSCConfig.dataset={dataset!r} is neither "wikitext2" nor an existing text file')
    return [row for row in rows_from_lines(path.read_text(encoding="utf-8")) if row]
