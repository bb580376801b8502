"""A data file → validated :class:`TextDataset`, label maps, stratified splits, tokenisation and length-grouped
batching.

:func:`read_csv` is the one entry point for data: CSV (also ``.txt``), TSV, JSON Lines, JSON (a list of records, or
a pandas ``to_json`` frame), Parquet and a pandas DataFrame. A reader per format turns the input into a header and
rows of strings (:class:`_Table`); every format then goes through the same validation with the same messages. The
format comes from the file's name (or ``format=``); without one, from its content.

Every problem with an input file raises :class:`~dact_lib.errors.DataError`; its message says what is wrong and
how to fix it. Row numbers in messages count the header as row 1 (as a spreadsheet shows them) in a CSV, the lines
of a JSON Lines file, the records of a JSON file and the rows of a Parquet file or DataFrame (from 1).
"""
from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import math
import re
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence, TextIO, Union

import numpy as np
import pandas as pd
import torch

from .errors import DataError

MAX_BYTES: int = 50 * 1024 * 1024
DEMO_CSV: Path = Path(__file__).resolve().parent / "demo_data" / "demo.csv"

SINGLE_TASK = ["label"]
MULTI_TASKS = ["class_label", "sentiment_label"]
TEXT_NAMES = ("text", "sentence", "question")
LABEL_NAMES = ("label", "category", "class", "class_label")
CANONICAL_KEYS = ("text", "sentence", "label", "class_label", "sentiment_label")
DELIMITERS = (",", ";", "\t")
MAX_ROWS_SHOWN = 10
# A few stray numeric texts (an SMS reading "645") are kept with a warning; more than this share of the rows
# means the wrong column is used as text, which is an error.
NUMERIC_TEXT_MAX_SHARE = 0.01

_NUMERIC_TEXT = r"[+\-]?\d+(?:[.,\s]\d+)*"  # "1234", "1,234.5" — not "10/10"
_NUMERIC_LABEL = re.compile(r"[+\-]?\d+(\.\d+)?")

Source = Union[str, Path, bytes, bytearray, BinaryIO, TextIO, Any]


# --------------------------------------------------------------------------------------------------------------
# TextDataset
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class TextDataset:
    """Texts with one or two tasks of integer targets. Equality compares texts, label maps and targets."""

    texts: list[str]
    targets: dict[str, np.ndarray]
    label_maps: dict[str, list[str]]
    name: str = "dataset"
    content_hash: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.targets = {t: np.asarray(y, dtype=np.int64) for t, y in self.targets.items()}
        if set(self.targets) != set(self.label_maps):
            raise DataError(f"targets have tasks {sorted(self.targets)} but label_maps has {sorted(self.label_maps)}: "
                            "give one label map per task.")
        for task, y in self.targets.items():
            if len(y) != len(self.texts):
                raise DataError(f"task {task!r} has {len(y)} targets for {len(self.texts)} texts: give one per text.")

    # -- tasks --------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Task names: ``["label"]`` or ``["class_label", "sentiment_label"]``."""
        return list(self.targets)

    @property
    def is_multitask(self) -> bool:
        return len(self.targets) > 1

    def _task(self, task: str | None) -> str:
        if task is None:
            return self.tasks[0]
        if task not in self.targets:
            raise DataError(f"Unknown task {task!r}: this dataset has tasks {self.tasks}.")
        return task

    def num_classes(self, task: str | None = None) -> int:
        return len(self.label_maps[self._task(task)])

    def class_counts(self, task: str | None = None) -> dict[str, int]:
        """Rows per class name (every class of the label map, zero included), in label-map order."""
        task = self._task(task)
        counts = np.bincount(self.targets[task], minlength=len(self.label_maps[task]))
        return {name: int(c) for name, c in zip(self.label_maps[task], counts)}

    # -- views and export ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TextDataset):
            return NotImplemented
        return (self.texts == other.texts and self.label_maps == other.label_maps
                and list(self.targets) == list(other.targets)
                and all(np.array_equal(self.targets[t], other.targets[t]) for t in self.targets))

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TextDataset":
        """The rows at ``indices`` (in that order), with the same label maps, name and hash."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset(texts=[self.texts[i] for i in idx],
                           targets={t: y[idx] for t, y in self.targets.items()},
                           label_maps={t: list(m) for t, m in self.label_maps.items()},
                           name=self.name, content_hash=self.content_hash, columns=dict(self.columns),
                           warnings=list(self.warnings))

    def to_frame(self) -> pd.DataFrame:
        """Canonical columns: ``text,label`` or ``sentence,class_label,sentiment_label``."""
        text_col = "sentence" if self.is_multitask else "text"
        data: dict[str, list[str]] = {text_col: list(self.texts)}
        for task, y in self.targets.items():
            names = self.label_maps[task]
            data[task] = [names[i] for i in y]
        return pd.DataFrame(data, dtype=object)

    def to_csv_bytes(self) -> bytes:
        """The canonical UTF-8 CSV; :func:`read_csv` reads it back to an equal dataset."""
        return self.to_frame().to_csv(index=False, lineterminator="\n").encode("utf-8")


class ColumnError(DataError):
    """The text or label column cannot be found (or is ambiguous). ``problem`` says what; the message adds the
    library's fix (a ``columns=`` mapping); the Data page gives its own (its column-mapping widgets)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} {fix}")
        self.problem = problem


class IncompleteRowsError(DataError):
    """Rows with an empty text or label cell. ``rows``: their line numbers (the header is line 1) — the Data page
    offers to leave them out (``read_csv(..., drop_incomplete=True)``)."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def spreadsheet_safe_csv(csv_bytes: bytes) -> bytes:
    """A CSV for download: every cell that a spreadsheet would run as a formula (it starts with = + - @, a tab or
    a carriage return, and is not a plain number such as -1) gets a leading ``'`` (OWASP's CSV-injection
    advice), so opening the file runs nothing. The stored dataset is unchanged."""
    import csv
    import io

    csv.field_size_limit(max(csv.field_size_limit(), MAX_BYTES + 1))  # a cell may be as big as a file may be
    rows = list(csv.reader(io.StringIO(csv_bytes.decode("utf-8"), newline="")))
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow(["'" + c if c.startswith(_FORMULA_START) and not _NUMBER.match(c) else c for c in row])
    return out.getvalue().encode("utf-8")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
def _fmt_size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n:,} bytes"


def _too_big(size: int, max_bytes: int) -> DataError:
    got, limit = _fmt_size(size), _fmt_size(max_bytes)
    if got == limit:  # "50.0 MiB, over the limit of 50.0 MiB" reads as a contradiction: give the bytes
        got, limit = f"{size:,} bytes", f"{max_bytes:,} bytes"
    return DataError(f"The file is {got}, over the limit of {limit}: sample the file "
                     "(keep fewer rows) before uploading, or raise the limit (max_bytes).")


def _read_source(source: Source, max_bytes: int) -> tuple[bytes, str, str]:
    """Raw bytes, a default name and the file name ("" when there is none: bytes, an unnamed stream); the size is
    checked before the content is read where possible."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        if len(raw) > max_bytes:
            raise _too_big(len(raw), max_bytes)
        return raw, "dataset", ""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"File {str(path)!r} does not exist: check the path.")
        if not path.is_file():
            raise DataError(f"{str(path)!r} is not a file: give the path of a data file (CSV, TSV, JSON Lines, "
                            "JSON or Parquet).")
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_big(size, max_bytes)
        return path.read_bytes(), path.stem, path.name
    if hasattr(source, "read"):
        file_name = str(getattr(source, "name", "") or "")
        name = Path(file_name or "dataset").stem or "dataset"
        declared = getattr(source, "size", None)  # an upload widget's file knows its size before it is read
        if isinstance(declared, int) and declared > max_bytes:
            raise _too_big(declared, max_bytes)
        if hasattr(source, "seekable") and source.seekable():
            source.seek(0, io.SEEK_END)
            size = source.tell()
            source.seek(0)
            if size > max_bytes:
                raise _too_big(size, max_bytes)
        data = source.read(max_bytes + 1)
        if isinstance(data, str):
            data = data.encode("utf-8")
        data = bytes(data)
        if len(data) > max_bytes:
            raise _too_big(len(data), max_bytes)
        return data, name, Path(file_name).name
    raise DataError(f"Cannot read a dataset from a {type(source).__name__}: give a file path, bytes, an open file or "
                    "a pandas DataFrame.")


# --------------------------------------------------------------------------------------------------------------
# Formats: which reader a file goes to
# --------------------------------------------------------------------------------------------------------------
#: the formats read_csv reads (a pandas DataFrame is a source of its own)
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
#: file name suffix -> format
SUFFIX_FORMATS = {".csv": "csv", ".txt": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
#: what a file uploader accepts (the suffixes above, without the dot)
UPLOAD_TYPES = [k.lstrip(".") for k in SUFFIX_FORMATS]
_FORMAT_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "json": "JSON", "parquet": "Parquet"}
_FORMAT_SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}
_EXPORTS = ("export it as CSV (UTF-8), JSON Lines or Parquet, e.g. with pandas: df.to_csv(path, index=False), "
            "df.to_json(path, orient='records', lines=True) or df.to_parquet(path)")
_SUPPORTED = "CSV, TSV, JSON Lines (.jsonl), JSON (.json: a list of records) or Parquet"


def format_of(file_name: str | Path | None) -> str | None:
    """The format a file's name says (``reviews.jsonl`` → ``"jsonl"``), or None for no name / another suffix."""
    if not file_name:
        return None
    return SUFFIX_FORMATS.get(Path(str(file_name)).suffix.lower())


def _binary_kind(raw: bytes) -> tuple[str, str] | None:
    """(what the bytes are, the fix) for a binary file that is none of the formats (magic numbers); None else."""
    head = raw[:8]
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if b"xl/" in raw[:65536]:
            return ("a binary Excel workbook (.xlsx)", "open it in Excel (or pandas.read_excel) and " + _EXPORTS)
        if b"mimetypeapplication/vnd.oasis.opendocument.spreadsheet" in raw[:200]:
            return ("a binary OpenDocument spreadsheet (.ods)", "open it in its program and " + _EXPORTS)
        return ("a binary zip archive (an Excel .xlsx workbook or a .zip?)",
                "if it is a workbook, open it in Excel (or pandas.read_excel) and " + _EXPORTS + "; if it is a "
                "zip, unzip it and give the data file inside")
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return ("a binary Excel .xls workbook (or another Office file)", "open it in Excel and " + _EXPORTS)
    if head.startswith(b"\x1f\x8b"):
        return ("gzip-compressed (binary)", "decompress it first (gunzip FILE.gz, or 7-Zip) and give the file inside")
    if head.startswith(b"BZh"):
        return ("bzip2-compressed (binary)", "decompress it first (bunzip2 FILE.bz2) and give the file inside")
    if head.startswith(b"\xfd7zXZ\x00"):
        return ("xz-compressed (binary)", "decompress it first (unxz FILE.xz) and give the file inside")
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return ("a binary 7-Zip archive", "extract it and give the data file inside (" + _SUPPORTED + ")")
    if head.startswith(b"%PDF"):
        return ("a binary PDF document", "export the table from the program that made it as CSV (UTF-8)")
    if raw.startswith(b"SQLite format 3\x00"):
        return ("a binary SQLite database", "export the table with sqlite3 (.mode csv, .headers on) or "
                "pandas.read_sql and " + _EXPORTS.replace("export it as", "save it as"))
    if head.startswith(b"ARROW1"):
        return ("a binary Arrow/Feather file", "save it as Parquet: pandas.read_feather(path).to_parquet(path2)")
    return None


def _looks_html(raw: bytes) -> bool:
    start = raw[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html", b"<?xml version")) and b"<html" in raw[:4096].lower()


def _json_shape(raw: bytes) -> str | None:
    """What JSON text the bytes hold: ``"records"`` (one JSON document: a list or an object), ``"lines"`` (one
    object per line), or None when they are not JSON."""
    start = raw[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start.startswith((b"[", b"{")):
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    try:
        json.loads(text)
        return "records"
    except ValueError:
        pass
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return "lines" if isinstance(json.loads(first), dict) else None
    except ValueError:
        return None


def _detect_format(raw: bytes, hint: str | None, file_name: str) -> str:
    """The format to read ``raw`` as. The name (``hint``: the file name's, or ``format=``) decides; content that
    contradicts it, or that is none of the formats, is refused with what it looks like and the fix. Without a hint
    the content decides."""
    suffix = Path(file_name).suffix if file_name else ""
    named = f"named {suffix}" if suffix else f"read as {_FORMAT_NAMES.get(hint or '', hint)} (format={hint!r})"

    def fix(fmt: str) -> str:
        return f"rename it to {_FORMAT_SUFFIX[fmt]}" if suffix else f"read it with format={fmt!r}"

    binary = _binary_kind(raw)
    if binary is not None:
        what, how = binary
        raise DataError(f"The file is {what}, not {_SUPPORTED}: {how}.")
    is_parquet = raw[:4] == b"PAR1"
    if _looks_html(raw):
        raise DataError("The file is an HTML page, not data: download the data file itself (on GitHub, the Raw "
                        "button; elsewhere the download link), not the web page that shows it.")
    if hint is None:
        if is_parquet:
            return "parquet"
        shape = _json_shape(raw)
        return {"records": "json", "lines": "jsonl"}.get(shape or "", "csv")
    if hint == "parquet":
        if is_parquet:
            return "parquet"
        shape = _json_shape(raw)
        if shape is not None:
            good = "json" if shape == "records" else "jsonl"
            raise DataError(f"The file is {named} but holds {_FORMAT_NAMES[good]} ({_FORMAT_SUFFIX[good]}), not "
                            f"Parquet: {fix(good)}.")
        raise DataError(f"The file is {named} but is not a Parquet file (it does not start with PAR1): write it "
                        "again with df.to_parquet(path), or "
                        + ("rename it to what it is (.csv, .jsonl, .json)." if suffix else
                           "read it with the format it is (format='csv', 'jsonl' or 'json')."))
    if is_parquet:
        raise DataError(f"The file is {named} but is a Parquet file (binary): {fix('parquet')}.")
    if hint in ("csv", "tsv"):
        shape = _json_shape(raw)
        if shape is not None:
            good = "json" if shape == "records" else "jsonl"
            holds = "one JSON document" if shape == "records" else "one JSON object per line"
            raise DataError(f"The file is {named} but holds JSON ({holds}), not {_FORMAT_NAMES[hint]} with a header "
                            f"row: {fix(good)}.")
    return hint


def _decode(raw: bytes, warnings: list[str]) -> str:
    """UTF-8 (BOM stripped), UTF-32 / UTF-16 with a BOM, else Latin-1 (Windows-1252) with a warning. A NUL byte
    anywhere (outside a UTF-16/32 file) means a binary file."""
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                     (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                text = raw.decode(enc)
            except UnicodeDecodeError:
                break
            if "\x00" in text:
                break
            return text
    if b"\x00" in raw or raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"%PDF")):
        raise DataError("The file looks like a binary file (an Excel .xlsx/.xls, a zip, an image?), not text data: "
                        "open it in its program and export (Save As) a CSV (UTF-8) file, or give JSON Lines, JSON "
                        "or Parquet.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for enc in ("cp1252", "latin-1"):
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        warnings.append("decoded as Latin-1 (Windows-1252) because the file is not valid UTF-8; if accents or "
                        "quotes look wrong, save the file as CSV UTF-8 and upload it again.")
        return text
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip("\r")


def _sniff_delimiter(text: str) -> str:
    """The delimiter among , ; and tab: the only one in the header line; else csv.Sniffer when it agrees with the
    header; else the one the header holds most often."""
    header = _first_line(text)
    in_header = [d for d in DELIMITERS if d in header]
    if len(in_header) == 1:
        return in_header[0]
    try:
        sep = csv.Sniffer().sniff(text[:65536], delimiters="".join(DELIMITERS)).delimiter
        if sep in DELIMITERS and sep in header:
            return sep
    except csv.Error:
        pass
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    if counts[best] == 0:
        shown = header if len(header) <= 60 else header[:57] + "..."
        raise DataError(f"The file is not a CSV with several columns: its header {shown!r} has no delimiter "
                        "(comma, semicolon or tab). Save it as CSV with a header row such as text,label.")
    return best


@dataclass
class _Table:
    """What a reader makes of a file: the column names, the data rows as string cells (columns 0..n-1), each row's
    number as messages give it, and how they name it (``unit``: row / line / record; ``note``: how to count)."""

    header: list[str]
    body: pd.DataFrame
    numbers: np.ndarray
    unit: str = "row"
    note: str = ""

    def where(self, positions: Sequence[int] | np.ndarray) -> str:
        """'rows 3, 7 (counting the header as row 1)' for body positions (at most MAX_ROWS_SHOWN numbers)."""
        numbers = [int(self.numbers[p]) for p in positions]
        shown = ", ".join(str(n) for n in numbers[:MAX_ROWS_SHOWN])
        more = f" and {len(numbers) - MAX_ROWS_SHOWN} more" if len(numbers) > MAX_ROWS_SHOWN else ""
        return f"{self.unit}{'s' if len(numbers) > 1 else ''} {shown}{more}{self.note}"


_CSV_NOTE = " (counting the header as row 1)"


def _csv_table(raw: bytes, warnings: list[str], tsv: bool = False) -> _Table:
    text = _decode(raw, warnings).replace("\r\n", "\n")
    if not text.strip():
        raise DataError("The file is empty (only blank lines): upload a CSV with a header row and data rows.")
    text = text.lstrip("\n")
    sep = "\t" if tsv and "\t" in _first_line(text) else _sniff_delimiter(text)
    header, body = _parse(text, sep)
    return _Table(header, body, np.arange(len(body), dtype=np.int64) + 2, "row", _CSV_NOTE)


def _cell(value: Any, column: str, number: int, unit: str) -> str:
    """A JSON / Parquet / DataFrame value as the string a CSV cell would hold: None and NaN are empty; numbers and
    booleans their text; a list or an object is refused."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return ""
    if isinstance(value, (dict, list, tuple, np.ndarray, bytes, bytearray)):
        kind = ("an object" if isinstance(value, dict) else
                "binary data" if isinstance(value, (bytes, bytearray)) else "a list")
        raise DataError(f"The field {column!r} of {unit} {number} holds {kind}: text and label fields must be "
                        "strings (or numbers). Flatten the data so that every record has plain text and label "
                        "values.")
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return str(value)


def _records_table(records: Sequence[Any], numbers: Sequence[int], unit: str, what: str) -> _Table:
    """A table from JSON objects (one per row): the header is every key in order of first appearance; a key a
    record lacks is an empty cell."""
    header: list[str] = []
    seen: dict[str, int] = {}
    for rec, n in zip(records, numbers):
        if not isinstance(rec, dict):
            kind = {list: "a list", str: "a string", type(None): "null"}.get(type(rec), "a number")
            raise DataError(f"{unit.capitalize()} {n} of the {what} is {kind}, not an object: every {unit} must be "
                            'one JSON object such as {"text": "a fine film", "label": "pos"}.')
        for k in rec:
            if k not in seen:
                seen[k] = len(header)
                header.append(k)
                if len(header) > MAX_COLUMNS:
                    break
    if len(header) > MAX_COLUMNS:
        _resolve_columns(header, None)  # refuses with the too-many-columns message
    cols = {i: [_cell(rec.get(k), k, n, unit) for rec, n in zip(records, numbers)] for i, k in enumerate(header)}
    body = pd.DataFrame(cols, dtype=object) if header else pd.DataFrame(index=range(len(records)))
    return _Table([str(h).strip() for h in header], body, np.asarray(list(numbers), dtype=np.int64), unit)


def _columns_table(names: Sequence[Any], columns: Sequence[Sequence[Any]], unit: str = "row") -> _Table:
    """A table from whole columns (Parquet, a DataFrame, pandas' column-wise JSON); rows count from 1."""
    header = [str(n).strip() for n in names]
    n_rows = len(columns[0]) if columns else 0
    numbers = np.arange(1, n_rows + 1, dtype=np.int64)
    if len(header) > MAX_COLUMNS:
        _resolve_columns(header, None)
    cols = {i: [_cell(v, header[i], int(n), unit) for v, n in zip(col, numbers)] for i, col in enumerate(columns)}
    body = pd.DataFrame(cols, dtype=object) if header else pd.DataFrame(index=range(n_rows))
    return _Table(header, body, numbers, unit)


def _jsonl_table(raw: bytes, warnings: list[str]) -> _Table:
    text = _decode(raw, warnings).replace("\r\n", "\n")
    records, numbers = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            detail = getattr(exc, "msg", str(exc))
            hint = (" The file holds one JSON document (a list), not one object per line: rename it to .json."
                    if n == 1 and line.lstrip().startswith("[") else "")
            raise DataError(f"Line {n} of the JSON Lines file is not valid JSON ({detail}, column "
                            f"{getattr(exc, 'colno', '?')}): put one JSON object per line, such as "
                            f'{{"text": "a fine film", "label": "pos"}}, e.g. with pandas: '
                            f"df.to_json(path, orient='records', lines=True).{hint}") from None
        numbers.append(n)
    if len(records) == 1 and isinstance(records[0], list):
        raise DataError("The JSON Lines file holds one JSON list, not one object per line: rename it to .json, or "
                        "write one object per line (df.to_json(path, orient='records', lines=True)).")
    return _records_table(records, numbers, "line", "JSON Lines file")


def _json_table(raw: bytes, warnings: list[str]) -> _Table:
    """A JSON list of records, or one of pandas' column-wise layouts (``to_json``'s default ``columns`` orient,
    ``split``, ``table``); any other object is refused, naming what it holds."""
    text = _decode(raw, warnings)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        if _json_shape(raw) == "lines":
            raise DataError("The JSON file holds one JSON object per line (JSON Lines), not one document: rename "
                            "it to .jsonl.") from None
        raise DataError(f"The file is not valid JSON ({getattr(exc, 'msg', exc)} at line "
                        f"{getattr(exc, 'lineno', '?')}, column {getattr(exc, 'colno', '?')}): write it again, e.g. "
                        "with pandas: df.to_json(path, orient='records').") from None
    if isinstance(doc, list):
        return _records_table(doc, range(1, len(doc) + 1), "record", "JSON file")
    if isinstance(doc, dict):
        if isinstance(doc.get("data"), list) and isinstance(doc.get("columns"), list):  # orient="split"
            rows = doc["data"]
            if not all(isinstance(r, list) and len(r) == len(doc["columns"]) for r in rows):
                raise DataError("The JSON file looks like pandas' split layout (columns + data) but its data rows "
                                "do not match its columns: write it again with df.to_json(path, orient='records').")
            return _columns_table(doc["columns"], [[r[i] for r in rows] for i in range(len(doc["columns"]))],
                                  "record")
        if isinstance(doc.get("schema"), dict) and isinstance(doc.get("data"), list):  # orient="table"
            table = _records_table(doc["data"], range(1, len(doc["data"]) + 1), "record", "JSON file")
            key = doc["schema"].get("primaryKey")  # the index's column names (pandas writes the index)
            index = [k for k in key if isinstance(k, str)] if isinstance(key, list) else []
            keep = [i for i, h in enumerate(table.header) if h not in index]
            table.header = [table.header[i] for i in keep]
            table.body = table.body[keep]
            table.body.columns = range(len(keep))
            return table
        if doc and all(isinstance(v, dict) for v in doc.values()):  # orient="columns", pandas' default
            index = list(dict.fromkeys(k for v in doc.values() for k in v))
            return _columns_table(list(doc), [[col.get(i) for i in index] for col in doc.values()], "record")
        lists = [(k, len(v)) for k, v in doc.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        keys = _names_text([str(k) for k in doc])
        inner = (f" Its key {lists[0][0]!r} holds a list of {lists[0][1]:,} records: save that list alone."
                 if lists else "")
        raise DataError(f"The JSON file holds an object (keys {keys}), not a list of records: save a list such "
                        'as [{"text": "a fine film", "label": "pos"}, ...], e.g. with pandas: '
                        f"df.to_json(path, orient='records').{inner}")
    kind = {str: "a string", bool: "a boolean", type(None): "null"}.get(type(doc), "a number")
    raise DataError(f"The JSON file holds {kind}, not a list of records: save a list such as "
                    '[{"text": "a fine film", "label": "pos"}, ...].')


def _parquet_table(raw: bytes) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a requirement
        raise DataError("Reading Parquet needs pyarrow: pip install pyarrow, or give the data as CSV or JSON "
                        "Lines.") from None
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"The file could not be read as Parquet ({detail}): write it again, e.g. with pandas: "
                        "df.to_parquet(path).") from None
    meta = (table.schema.metadata or {}).get(b"pandas")
    index = []
    if meta:  # pandas stores a non-default index as columns named __index_level_0__ …
        try:
            index = [c for c in json.loads(meta).get("index_columns", []) if isinstance(c, str)]
        except ValueError:
            index = []
    names = [n for n in table.column_names if n not in index]
    return _columns_table(names, [table.column(n).to_pylist() for n in names])


def _frame_table(df: pd.DataFrame) -> _Table:
    if isinstance(df.columns, pd.MultiIndex):
        raise DataError("The DataFrame has several column levels: flatten them first (df.columns = "
                        "['_'.join(map(str, c)) for c in df.columns]).")
    return _columns_table(list(df.columns), [df[c].tolist() if not isinstance(df[c], pd.DataFrame) else
                                             df[c].iloc[:, 0].tolist() for c in df.columns])


def _read_table(raw: bytes, fmt: str, warnings: list[str]) -> _Table:
    if fmt in ("csv", "tsv"):
        return _csv_table(raw, warnings, tsv=fmt == "tsv")
    if fmt == "jsonl":
        return _jsonl_table(raw, warnings)
    if fmt == "json":
        return _json_table(raw, warnings)
    return _parquet_table(raw)


def _check_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    f = str(fmt).lower().lstrip(".")
    f = SUFFIX_FORMATS.get("." + f, f)
    if f not in FORMATS:
        raise DataError(f"Unknown data format {fmt!r}: use one of {', '.join(FORMATS)} (or leave it out to go by "
                        "the file's name and content).")
    return f


def csv_header(raw: bytes, format: str | None = None) -> list[str]:
    """The column names of a data file (a CSV's header row, decoded and split the way :func:`read_csv` does it;
    the keys / columns of the other formats); [] when there are none or the bytes cannot be read. Never raises: it
    only offers names to map columns by."""
    try:
        fmt = _detect_format(raw, _check_format(format), "")
    except DataError:
        return []
    if fmt not in ("csv", "tsv"):
        try:
            return [h for h in _read_table(raw, fmt, []).header if h]
        except DataError:
            return []
    first = raw.lstrip(b"\r\n").split(b"\n", 1)[0] if not raw.startswith((b"\xff\xfe", b"\xfe\xff")) else raw[:65536]
    try:
        text = _first_line(_decode(first, []))
        sep = "\t" if fmt == "tsv" and "\t" in text else _sniff_delimiter(text)
        return [h.strip().lstrip("\ufeff").strip() for h in next(csv.reader([text], delimiter=sep)) if h.strip()]
    except (DataError, csv.Error, StopIteration):
        return []


def csv_rows(raw: bytes, rows: Sequence[int], limit: int = 50, format: str | None = None) -> pd.DataFrame:
    """The data rows of a data file at the given row numbers (as :class:`IncompleteRowsError` gives them: a CSV's
    rows counting the header as row 1, a JSON Lines file's lines, a JSON file's records, a Parquet file's rows),
    parsed the way :func:`read_csv` parses — to show a user the rows a fix would drop. The first column, named
    row / line / record, holds the numbers."""
    table = _read_table(raw, _detect_format(raw, _check_format(format), ""), [])
    body = table.body.copy()
    body.columns = table.header if len(table.header) == body.shape[1] else [
        table.header[i] if i < len(table.header) else "" for i in range(body.shape[1])]
    where = {int(n): i for i, n in enumerate(table.numbers)}
    keep = [where[int(r)] for r in list(rows)[:limit] if int(r) in where]
    out = body.iloc[keep].copy()
    out.insert(0, table.unit, [int(table.numbers[i]) for i in keep])
    return out.reset_index(drop=True)


def _parse(text: str, sep: str) -> tuple[list[str], pd.DataFrame]:
    """Header names and the data rows (all strings) of a CSV text."""
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, header=None,
                             skip_blank_lines=False, quotechar='"', engine="c")
    except pd.errors.EmptyDataError:
        raise DataError("The file is empty: upload a CSV with a header row and at least one data row.") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        detail = str(exc).strip().replace("Error tokenizing data. C error: ", "")
        raise DataError(f"The file could not be read as CSV ({detail}). A field probably contains the delimiter "
                        f"{sep!r} or a stray quote: put such fields in double quotes, or export the file again as "
                        "CSV.") from None
    df = df.fillna("")
    header = [str(h).strip() for h in df.iloc[0].tolist()] if len(df) else []
    if header:
        header[0] = header[0].lstrip("\ufeff").strip()
    body = df.iloc[1:].copy()
    body.columns = range(body.shape[1])
    return header, body


def _norm(name: str) -> str:
    return name.strip().lower()


#: more columns than this is not a labelled-text CSV (and reading them would stall the server)
MAX_COLUMNS = 1000


def _names_text(header: Sequence[str], limit: int = 20, width: int = 60) -> str:
    """The file's column names for a message: each cut to ``width`` characters, at most ``limit`` of them."""
    shown = [repr(h if len(h) <= width else h[:width] + "…") for h in header[:limit]]
    more = f" and {len(header) - limit:,} more" if len(header) > limit else ""
    return ", ".join(shown) + more


# complexity: one check per way a header can be wrong, each with its own message
def _resolve_columns(header: list[str], columns: dict[str, str] | None) -> tuple[list[str], dict[str, int]]:
    """(tasks, canonical name -> column position). Canonical text key is 'text' here."""
    if len(header) > MAX_COLUMNS:
        raise DataError(f"The file has {len(header):,} columns: a labelled-text CSV has a few (text and label, or "
                        f"sentence, class_label and sentiment_label), at most {MAX_COLUMNS:,}. Check the delimiter, "
                        "or keep only the columns you need.")
    found = _names_text(header)
    norm = [_norm(h) for h in header]
    counts = collections.Counter(norm)
    dupes = sorted(n for n, c in counts.items() if n and c > 1)  # unnamed columns (trailing delimiters) are ok
    if dupes:
        where = "; ".join(f"{d!r} (columns {', '.join(str(i + 1) for i, n in enumerate(norm) if n == d)})"
                          for d in dupes)
        raise DataError(f"The file has duplicate column names: {where}. Rename the columns so every header is "
                        "unique.")

    def position(file_col: str, key: str) -> int:
        if file_col in header:
            return header.index(file_col)
        if _norm(file_col) in norm:
            return norm.index(_norm(file_col))
        raise DataError(f"Column {file_col!r} (given for {key!r}) is not in the file; the file's columns are "
                        f"{found}. Fix the column mapping.")

    explicit: dict[str, int] = {}
    for key, file_col in (columns or {}).items():
        canon = _norm(str(key))
        if canon not in CANONICAL_KEYS:
            raise DataError(f"Unknown column-mapping key {key!r}: use {', '.join(CANONICAL_KEYS)} (text and "
                            f"sentence mean the same). The file's columns are {found}.")
        canon = "text" if canon == "sentence" else canon
        if canon in explicit:
            raise DataError("The column mapping gives both 'text' and 'sentence': give only one of them.")
        explicit[canon] = position(str(file_col), str(key))

    if "label" in explicit and ({"class_label", "sentiment_label"} & set(explicit)):
        raise DataError("The column mapping mixes 'label' (one task) with 'class_label'/'sentiment_label' (two "
                        "tasks): give either text+label or sentence+class_label+sentiment_label.")
    if "label" in explicit:
        tasks = list(SINGLE_TASK)
    elif {"class_label", "sentiment_label"} & set(explicit):
        tasks = list(MULTI_TASKS)
    else:
        tasks = list(MULTI_TASKS) if {"class_label", "sentiment_label"} <= set(norm) else list(SINGLE_TASK)

    def guess(key: str, names: Sequence[str]) -> int:
        hits = [i for i, n in enumerate(norm) if n in names]
        if len(hits) == 1:
            return hits[0]
        example = "{'text': ..., 'label': ...}" if key in ("text", "label") else \
            "{'sentence': ..., 'class_label': ..., 'sentiment_label': ...}"
        if not hits:
            raise ColumnError(f"No {key} column found. The file's columns are {found}; accepted names for the {key} "
                              f"column are {', '.join(names)}.",
                              f"Rename the column or pass a column mapping, e.g. columns={example}.")
        which = _names_text([header[i] for i in hits])
        raise ColumnError(f"Ambiguous {key} column: the file has {which}.",
                          f"Say which one to use with a column mapping, e.g. columns={{'{key}': {header[hits[0]]!r}}}.")

    resolved: dict[str, int] = {"text": explicit["text"] if "text" in explicit else guess("text", TEXT_NAMES)}
    for task in tasks:
        resolved[task] = explicit[task] if task in explicit else guess(task, LABEL_NAMES if task == "label"
                                                                       else (task,))
    used = list(resolved.values())
    if len(set(used)) != len(used):
        raise DataError("The same file column is used for the text and a label (or for two labels): map each "
                        f"canonical column to a different file column. The file's columns are {found}.")
    return tasks, resolved


def _label_sort_key(name: str) -> tuple[int, float, str]:
    if _NUMERIC_LABEL.fullmatch(name):
        return (0, float(name), name)
    return (1, 0.0, name)


def sort_labels(names: Iterable[str]) -> list[str]:
    """Sorted unique class names; numeric-looking names sort numerically ("2" < "10") before the others."""
    return sorted(set(names), key=_label_sort_key)


def _stratified_sample(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k row positions, stratified on y when possible, in file order."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    try:
        idx, _ = train_test_split(np.arange(n), train_size=k, stratify=y, random_state=seed, shuffle=True)
    except ValueError:  # a class with a single row, or fewer rows asked than classes
        idx = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return np.sort(np.asarray(idx, dtype=np.int64))


def stratified_subset(ds: TextDataset, k: int, seed: int = 0) -> TextDataset:
    """``k`` rows of ``ds`` (all of them when ``k >= len(ds)``), stratified on the first task's classes when
    possible, in file order."""
    if k >= len(ds):
        return ds
    return ds.subset(_stratified_sample(ds.targets[ds.tasks[0]], int(k), seed))


# complexity: the one entry point of every format: one validation step after another, each with its message
def read_csv(source: Source, *, columns: dict[str, str] | None = None, max_rows: int | None = None,
             name: str | None = None, max_bytes: int = MAX_BYTES, label_maps: dict[str, list[str]] | None = None,
             seed: int = 0, drop_incomplete: bool = False, format: str | None = None) -> TextDataset:
    """Read and validate labelled data (a path, bytes, a file object or a pandas DataFrame) into a
    :class:`TextDataset`.

    Formats (:data:`FORMATS`): CSV (also ``.txt``; delimiter , ; or tab), TSV, JSON Lines, JSON (a list of
    records, or a pandas ``to_json`` frame) and Parquet. ``format`` names it; else the file's name does
    (:func:`format_of`: a path's or a file object's ``name``), else the content (Parquet's magic bytes, JSON,
    otherwise CSV). Content that contradicts the name, or that is none of the formats (Excel, zip, gzip, HTML, a
    JSON object that is not records …), is refused with what it looks like and the fix. Every format is validated
    the same way, with the same messages.

    ``columns`` maps canonical names (text|label or sentence|class_label|sentiment_label) to the file's columns;
    ``label_maps`` fixes the classes (labels outside them are an error); ``max_rows`` keeps a seeded stratified
    sample of that many rows in file order. Rows with an empty text or label cell are an error
    (:class:`IncompleteRowsError`, which names them) unless ``drop_incomplete``: then they are left out and a
    warning names them.
    """
    fmt = _check_format(format)
    warnings: list[str] = []
    if isinstance(source, pd.DataFrame):
        table = _frame_table(source)
        default_name = "dataframe"
        content_hash = hashlib.sha256(source.to_csv(index=False, lineterminator="\n").encode("utf-8")).hexdigest()
    else:
        raw, default_name, file_name = _read_source(source, max_bytes)
        if not raw.strip():
            raise DataError("The file is empty (0 bytes or only blank lines): upload a CSV with a header row such "
                            "as text,label and at least one data row.")
        content_hash = hashlib.sha256(raw).hexdigest()
        fmt = _detect_format(raw, fmt or format_of(file_name), file_name)
        table = _read_table(raw, fmt, warnings)
    header, body = table.header, table.body
    tasks, pos = _resolve_columns(header, columns)
    col_names = {("sentence" if len(tasks) > 1 and k == "text" else k): header[i] for k, i in pos.items()}

    # Fully blank rows (empty lines) are dropped; positions stay those of the file for row numbers.
    blank = (np.char.strip(body.to_numpy(dtype=str)) == "").all(axis=1) if len(body) else np.zeros(0, bool)
    file_pos = np.flatnonzero(~blank)
    body = body.iloc[file_pos]
    if len(body) == 0:
        raise DataError("The file has a header but no data rows: add at least one row of text and label."
                        if table.unit == "row" and table.note else
                        f"The data has no {table.unit}s: add at least one {table.unit} of text and label.")

    text_col = col_names.get("text", col_names.get("sentence"))
    if drop_incomplete:
        cells = [body[pos[k]].astype(str).str.strip().eq("").to_numpy() for k in ("text", *tasks)]
        incomplete = np.logical_or.reduce(cells)
        if incomplete.any():
            warnings.append(f"left out {int(incomplete.sum())} row(s) with an empty text or label cell at "
                            f"{table.where(file_pos[incomplete])}.")
            body, file_pos = body.iloc[~incomplete], file_pos[~incomplete]
            if len(body) == 0:
                raise DataError("Every row has an empty text or label cell: nothing is left to train on.")
    # every row with an empty text or label cell (what drop_incomplete would leave out), for the error
    all_incomplete = [int(table.numbers[r]) for r in file_pos[np.logical_or.reduce(
        [body[pos[k]].astype(str).str.strip().eq("").to_numpy() for k in ("text", *tasks)])]]
    texts_s = body[pos["text"]].astype(str).str.strip()
    empty = file_pos[texts_s.eq("").to_numpy()]
    if len(empty):
        raise IncompleteRowsError(
            f"The text column {text_col!r} has empty cells at {table.where(empty)}: "
            "fill in the text or delete those rows.", rows=all_incomplete)
    numeric = file_pos[texts_s.str.fullmatch(_NUMERIC_TEXT).to_numpy()]
    if len(numeric):
        if len(numeric) > NUMERIC_TEXT_MAX_SHARE * len(body):
            raise DataError(f"The text column {text_col!r} holds numbers instead of text at {table.where(numeric)}: "
                            "check that the right column is used as text (pass a "
                            "column mapping, e.g. columns={'text': ...}) or delete those rows.")
        warnings.append(f"the text column {text_col!r} holds only a number at {table.where(numeric)}; kept as text.")

    labels: dict[str, np.ndarray] = {}
    for task in tasks:
        lab = body[pos[task]].astype(str).str.strip()
        bad = file_pos[lab.eq("").to_numpy()]
        if len(bad):
            raise IncompleteRowsError(
                f"The label column {col_names[task]!r} has empty cells at {table.where(bad)}: give every row a class or delete those rows.", rows=all_incomplete)
        labels[task] = lab.to_numpy(dtype=object)

    maps: dict[str, list[str]] = {}
    targets: dict[str, np.ndarray] = {}
    for task in tasks:
        if label_maps is not None:
            if task not in label_maps:
                raise DataError(f"label_maps has no classes for task {task!r} (it has {sorted(label_maps)}): give "
                                f"one label map per task {tasks}.")
            lm = [str(x) for x in label_maps[task]]
            if len(set(lm)) != len(lm):
                raise DataError(f"The label map of task {task!r} repeats a class: {lm}. Give each class once.")
            unknown = sorted(set(labels[task]) - set(lm), key=_label_sort_key)
            if unknown:
                shown = ", ".join(repr(u) for u in unknown[:MAX_ROWS_SHOWN])
                raise DataError(f"The label column {col_names[task]!r} has classes that the model does not know: "
                                f"{shown}. Known classes are {lm}: fix those labels or train on data that includes "
                                "them.")
        else:
            lm = sort_labels(labels[task])
        if len(lm) < 2:
            raise DataError(f"The label column {col_names[task]!r} has only {len(lm)} class ({', '.join(lm)!s}): "
                            "a classifier needs at least 2 classes. Check that the right column is used as label "
                            "(column mapping) or add rows of other classes.")
        index = {c: i for i, c in enumerate(lm)}
        maps[task] = lm
        targets[task] = np.fromiter((index[v] for v in labels[task]), dtype=np.int64, count=len(labels[task]))

    texts = texts_s.tolist()
    base = name if name is not None else default_name
    if max_rows is not None:
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise DataError(f"max_rows = {max_rows!r} is invalid: give a positive whole number of rows, or None.")
        if len(texts) > max_rows:
            keep = _stratified_sample(_strata(targets, maps, tasks, 2), max_rows, seed)
            warnings.append(f"kept a stratified sample of {max_rows} of {len(texts)} rows (seed {seed}).")
            texts = [texts[i] for i in keep]
            targets = {t: y[keep] for t, y in targets.items()}
            if name is None:
                base = f"{base}[max_rows={max_rows}]"
    return TextDataset(texts=texts, targets=targets, label_maps=maps, name=base, content_hash=content_hash,
                       columns=col_names, warnings=warnings)


def load_demo_dataset() -> TextDataset:
    """The bundled demo set: 3 topics x 3 sentiments of short English sentences (two tasks)."""
    return read_csv(DEMO_CSV, name="demo")


# --------------------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DatasetSplit:
    train: TextDataset
    val: TextDataset
    test: TextDataset | None


def _strata(targets: dict[str, np.ndarray], maps: dict[str, list[str]], tasks: list[str], need: int) -> np.ndarray:
    """Stratification labels: the (class, sentiment) pair for two tasks when every pair has ``need`` rows."""
    first = targets[tasks[0]]
    if len(tasks) < 2:
        return first
    pair = first * len(maps[tasks[1]]) + targets[tasks[1]]
    counts = np.bincount(pair)
    return pair if counts[counts > 0].min() >= need else first


def _min_per_class(test_frac: float) -> int:
    """Fewest rows a class needs so both sklearn stratified splits succeed (>= 2 rows left for the second)."""
    if test_frac <= 0:
        return 2
    c = 3
    while c - math.ceil(c * test_frac - 1e-9) < 2:
        c += 1
    return c


def _held_out_size(n: int, frac: float) -> int:
    return math.ceil(n * frac)  # as sklearn's train_test_split counts a float test_size


def split_dataset(ds: TextDataset, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0) -> DatasetSplit:
    """Seeded stratified train/val/test split (file order kept inside each part); ``test_frac=0`` -> no test."""
    from sklearn.model_selection import train_test_split

    for label, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not (0 <= frac < 1):
            raise DataError(f"{label} = {frac!r} is invalid: give a fraction in [0, 1), e.g. 0.1.")
    if val_frac + test_frac >= 0.95:
        raise DataError(f"val_frac + test_frac = {val_frac + test_frac:.2f} leaves (almost) nothing to train on: "
                        "use smaller fractions (sum below 0.95).")
    n = len(ds)
    tasks = ds.tasks
    need = _min_per_class(test_frac)
    if val_frac > 0 or test_frac > 0:
        first = tasks[0]
        counts = ds.class_counts(first)
        small = [(c, k) for c, k in counts.items() if 0 < k < need]
        if small:
            cls, k = min(small, key=lambda x: x[1])
            parts = "train/val/test" if test_frac > 0 else "train/val"
            raise DataError(f"Class {cls!r} of {first!r} has only {k} row{'s' if k != 1 else ''}; a stratified "
                            f"{parts} split with val_frac={val_frac}, test_frac={test_frac} needs at least {need} "
                            "rows per class. Add more rows of this class, drop the class, or use smaller held-out "
                            "parts (test_frac=0 needs only 2 per class).")
    y = _strata(ds.targets, ds.label_maps, tasks, need)
    n_classes = len(np.unique(y))
    idx = np.arange(n)

    def check_size(part: str, size: int, total: int, frac: float) -> None:
        if size < n_classes:
            raise DataError(f"The {part} set would get {size} of {total} rows but the split is stratified over "
                            f"{n_classes} classes (at least one row of each per part): add more data or raise "
                            f"{part}_frac (to at least {n_classes / total:.2f}).")
        if total - size < n_classes:
            raise DataError(f"Only {total - size} rows would be left for training but the split is stratified over "
                            f"{n_classes} classes: use smaller val_frac/test_frac or add more data.")

    try:
        test_idx = None
        if test_frac > 0:
            check_size("test", _held_out_size(n, test_frac), n, test_frac)
            idx, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=seed)
        if val_frac > 0:
            rel = val_frac / (1.0 - test_frac)
            check_size("val", _held_out_size(len(idx), rel), len(idx), rel)
            train_idx, val_idx = train_test_split(idx, test_size=rel, stratify=y[idx], random_state=seed)
        else:
            train_idx, val_idx = idx, np.zeros(0, dtype=np.int64)
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"The stratified split failed ({exc}): a class is too small for val_frac={val_frac}, "
                        f"test_frac={test_frac}; add more data or use smaller fractions.") from None
    return DatasetSplit(train=ds.subset(np.sort(train_idx)), val=ds.subset(np.sort(val_idx)),
                        test=ds.subset(np.sort(test_idx)) if test_idx is not None else None)


# --------------------------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedDataset:
    """Token ids per text (unpadded, truncated, with special tokens) and the targets as tensors."""

    input_ids: list[list[int]]
    lengths: np.ndarray
    targets: dict[str, torch.Tensor]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tasks(self) -> list[str]:
        return list(self.targets)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "EncodedDataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        t_idx = torch.from_numpy(idx)
        return EncodedDataset(input_ids=[self.input_ids[i] for i in idx], lengths=self.lengths[idx],
                              targets={t: y[t_idx] for t, y in self.targets.items()},
                              pad_token_id=self.pad_token_id)


def encode(ds: TextDataset, tokenizer: Any, max_seq_len: int = 128) -> EncodedDataset:
    """Tokenise every text once (truncated to ``max_seq_len``, no padding)."""
    if len(ds) == 0:
        ids: list[list[int]] = []
    else:
        ids = [list(x) for x in tokenizer(list(ds.texts), truncation=True, max_length=max_seq_len,
                                          padding=False)["input_ids"]]
    pad = getattr(tokenizer, "pad_token_id", None)
    return EncodedDataset(input_ids=ids, lengths=np.array([len(x) for x in ids], dtype=np.int64),
                          targets={t: torch.from_numpy(np.asarray(y, dtype=np.int64).copy())
                                   for t, y in ds.targets.items()},
                          pad_token_id=int(pad) if pad is not None else 0)


def num_batches(enc: EncodedDataset, batch_size: int) -> int:
    return math.ceil(len(enc) / batch_size)


def _batch_order(enc: EncodedDataset, batch_size: int, shuffle: bool, seed: int, epoch: int,
                 group_by_length: bool, chunk_batches: int) -> list[np.ndarray]:
    n = len(enc)
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(n) if shuffle else np.arange(n)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    chunk = batch_size * max(1, chunk_batches)
    batches: list[np.ndarray] = []
    for start in range(0, n, chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(enc.lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iter_batches(enc: EncodedDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 group_by_length: bool = False, chunk_batches: int = 50,
                 pad_to: int | None = None) -> Iterator[dict[str, Any]]:
    """Batches padded to their longest item (or ``max(pad_to, longest)``); every row once per epoch.

    Shuffling uses ``numpy.random.default_rng((seed, epoch))``. ``group_by_length`` sorts chunks of
    ``batch_size * chunk_batches`` rows by length before cutting batches, then shuffles the batch order.
    """
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size!r} is invalid: give a positive whole number.")
    for idx in _batch_order(enc, batch_size, shuffle, seed, epoch, group_by_length, chunk_batches):
        longest = int(enc.lengths[idx].max()) if len(idx) else 0
        width = max(pad_to, longest) if pad_to is not None else longest
        ids = np.full((len(idx), width), enc.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            seq = enc.input_ids[i]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        t_idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        yield {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "targets": {t: y[t_idx] for t, y in enc.targets.items()}, "index": t_idx}
