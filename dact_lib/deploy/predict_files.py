"""Predictions on a file of texts: read and validate the whole input first, then predict in batches and write the
predictions atomically (a failure at any point leaves no output file, and an existing one unchanged).

Input formats, chosen by the file's extension:

* ``.csv`` / ``.tsv`` — a header row, then one text per row. The text column is found the way ``data.read_csv``
  finds it: the column named ``text``, ``sentence`` or ``question`` (any case); else the only column of the file;
  else an error naming the file's columns. Other columns (labels, ids) are ignored. Delimiters ``,`` ``;`` and tab
  are detected; quoted cells may hold the delimiter and newlines.
* ``.jsonl`` — one JSON value per line: an object with a ``text`` (or ``sentence`` / ``question``) string, or a
  plain JSON string.
* ``.txt`` — one text per line.

Empty lines are skipped in every format (e.g. the one a file ends with; in .txt and .jsonl a line of spaces too; in
a CSV a line of delimiters only); a row or object whose *text* is empty or blank (a CSV cell ``""``) is an error
naming its row (CSV: counting the header as row 1) or line, as is a row with more cells than the header, a line that
is not JSON or a text that is not a string. Texts are stripped of the whitespace
around them. UTF-8 is expected (a BOM is fine; UTF-16 with a BOM is read; other bytes are read as Windows-1252 with
a warning in the log).

Output formats, chosen by the output's extension: ``.csv`` — columns ``text, predicted_label, probability`` (+
``exit_layer`` for DACT; a multi-task model has ``<task>_predicted, <task>_probability`` per task instead) — or
``.jsonl`` — one object per text: ``text, label, probability, probabilities`` (+ ``exit_layer``; multi-task:
``tasks``). Rows are in the input's order, one per text.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import DactLabError
from .predictor import encodable
from ..files import atomic_write

log = logging.getLogger(__name__)

INPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".txt")
OUTPUT_FORMATS = (".csv", ".jsonl")
#: the names of a text column, in the order data.read_csv accepts them (``data.TEXT_NAMES``; tests keep them equal)
TEXT_COLUMNS = ("text", "sentence", "question")
MAX_INPUT_BYTES = 200 * 1024 * 1024
DELIMITERS = (",", ";", "\t")
_ONE_COLUMN = "\x1f"  # a one-column CSV is split on nothing: the unit separator never occurs in text
_SHOWN = 10

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _rows_list(rows: list[int], what: str = "row") -> str:
    shown = ", ".join(str(r) for r in rows[:_SHOWN])
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    return f"{what}{'s' if len(rows) > 1 else ''} {shown}{more}"


def _decode(raw: bytes, name: str) -> str:
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
                     (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError:
                break
    if b"\x00" in raw or raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"%PDF")):
        raise DactLabError(f"{name} looks like a binary file (an Excel .xlsx, a zip or a PDF?), not text: save it "
                           "as CSV (UTF-8), JSON Lines or plain text, one text per row.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not valid UTF-8: read as Windows-1252 (Latin-1); if accents look wrong in the output, "
                    "save the file as UTF-8.", name)
        return raw.decode("cp1252", errors="replace")


def _read_bytes(path: str | Path, data: bytes | None, max_bytes: int) -> bytes:
    size_limit = f"{max_bytes / (1024 * 1024):.0f} MiB"
    if data is not None:
        if len(data) > max_bytes:
            raise DactLabError(f"{path} is {len(data):,} bytes, over the limit of {size_limit}: split it into "
                               "smaller files.")
        return bytes(data)
    p = Path(path).expanduser()
    if not p.exists():
        raise DactLabError(f"Input file {str(p)!r} does not exist: check the path.")
    if not p.is_file():
        raise DactLabError(f"{str(p)!r} is not a file: give the path of a .csv, .tsv, .jsonl or .txt file.")
    if p.stat().st_size > max_bytes:
        raise DactLabError(f"{p} is {p.stat().st_size:,} bytes, over the limit of {size_limit}: split it into "
                           "smaller files.")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise DactLabError(f"{p} cannot be read ({exc.strerror}): check its permissions.") from None


def input_format(path: str | Path) -> str:
    """The input format of a file name (its lower-case extension), or an error naming the supported ones."""
    suffix = Path(str(path)).suffix.lower()
    if suffix not in INPUT_FORMATS:
        raise DactLabError(f"{Path(str(path)).name}: unsupported input format {suffix or '(no extension)'!r}; give "
                           "a .csv or .tsv file (a header row with a text column), .jsonl (one {\"text\": ...} per "
                           "line) or .txt (one text per line).")
    return suffix


def read_texts(path: str | Path, *, data: bytes | None = None, max_bytes: int = MAX_INPUT_BYTES) -> list[str]:
    """Every text of an input file (see the module's docstring for the formats), validated completely: any bad row
    is a :class:`DactLabError` naming it and the fix. ``data``: the file's bytes (an upload); ``path`` then only
    names it (its extension gives the format)."""
    fmt = input_format(path)
    name = Path(str(path)).name
    raw = _read_bytes(path, data, max_bytes)
    text = _decode(raw, name)
    if fmt in (".csv", ".tsv"):
        texts = _csv_texts(text, name, "\t" if fmt == ".tsv" else None)
    elif fmt == ".jsonl":
        texts = _jsonl_texts(text, name)
    else:
        texts = _txt_texts(text)
    if not texts:
        raise DactLabError(f"{name} holds no text to predict: add texts "
                           + ("below the header row." if fmt in (".csv", ".tsv") else "one per line."))
    return texts


def _lines(text: str) -> list[str]:
    """Lines as an editor numbers them (\\n, \\r\\n or \\r line ends; not the Unicode separators)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _txt_texts(text: str) -> list[str]:
    return [line.strip() for line in _lines(text) if line.strip()]


def _jsonl_texts(text: str, name: str) -> list[str]:
    texts = []
    example = 'one JSON object per line, e.g. {"text": "a great film"}, or a JSON string per line'
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DactLabError(f"{name} line {n} is not valid JSON ({exc.msg} at column {exc.colno}): write "
                               f"{example}.") from None
        except ValueError as exc:  # e.g. a number past Python's digit limit for int conversion
            raise DactLabError(f"{name} line {n} cannot be read ({exc}): write {example}.") from None
        if isinstance(value, dict):
            keys = [k for k in value if isinstance(k, str) and k.strip().lower() in TEXT_COLUMNS]
            if not keys:
                found = ", ".join(repr(k) for k in list(value)[:_SHOWN]) or "none"
                raise DactLabError(f"{name} line {n} has no text field (its keys: {found}): give each object a "
                                   f"\"text\" key (or \"sentence\").")
            if len(keys) > 1:
                raise DactLabError(f"{name} line {n} has several text fields ({', '.join(map(repr, keys))}): keep one "
                                   "of them.")
            value = value[keys[0]]
            where = f"{name} line {n}: the {keys[0]!r} value"
        else:
            where = f"{name} line {n}"
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise DactLabError(f"{where} is a {kind}, not a string: write the text as a JSON string, e.g. "
                               '{"text": "a great film"}.')
        if not value.strip():
            raise DactLabError(f"{where} is an empty text: give it some words or delete the line.")
        if not encodable(value):
            raise DactLabError(f"{where} holds a lone surrogate code point (e.g. \\ud800), not text: write it as "
                               "UTF-8 text.")
        texts.append(value.strip())
    return texts


def _sniff(header_line: str) -> str:
    present = [d for d in DELIMITERS if d in header_line]
    if not present:
        return _ONE_COLUMN
    if len(present) == 1:
        return present[0]
    return max(present, key=header_line.count)


def _csv_texts(text: str, name: str, delimiter: str | None) -> list[str]:
    body = text.lstrip("\r\n")
    if not body.strip():
        return []
    first = _lines(body)[0]
    sep = delimiter or _sniff(first)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_INPUT_BYTES))
    reader = csv.reader(io.StringIO(body, newline=""), delimiter=sep, strict=True)
    try:
        records = list(reader)
    except csv.Error as exc:
        raise DactLabError(f"{name} cannot be read as CSV at line {reader.line_num} ({exc}): a cell probably "
                           "holds a stray double quote; put such cells in double quotes with inner quotes doubled "
                           "(\"\"), or save the file again as CSV.") from None
    header = [h.strip() for h in records[0]]
    norm = [h.lower() for h in header]
    hits = [i for i, h in enumerate(norm) if h in TEXT_COLUMNS]
    found = ", ".join(repr(h) for h in header[:20]) + (f" and {len(header) - 20} more" if len(header) > 20 else "")
    if len(hits) > 1:
        raise DactLabError(f"{name} has several text columns ({', '.join(repr(header[i]) for i in hits)}): keep one "
                           "of them, or rename the others.")
    if hits:
        col = hits[0]
    elif len(header) == 1:
        col = 0
    else:
        raise DactLabError(f"{name} has no text column: its columns are {found}. Name the text column \"text\" "
                           "(or \"sentence\"), or keep only the text column.")
    texts, empty, ragged = [], [], []
    width = len(header)
    for n, rec in enumerate(records[1:], 2):  # the header is row 1, as a spreadsheet shows it
        if not rec or (len(rec) > 1 and not any(c.strip() for c in rec)):
            continue  # an empty line, or one of delimiters only (a spreadsheet's empty row); "" is an empty text
        if len(rec) > width and any(c.strip() for c in rec[width:]):
            ragged.append(n)
            continue
        cell = rec[col].strip() if col < len(rec) else ""
        if not cell:
            empty.append(n)
            continue
        texts.append(cell)
    if ragged:
        sep_name = {",": "comma", ";": "semicolon", "\t": "tab"}.get(sep, repr(sep))
        raise DactLabError(f"{name} has more cells than its header ({width}) at {_rows_list(ragged)} (counting the "
                           f"header as row 1): a text holds the delimiter ({sep_name}); put such texts in double "
                           "quotes.")
    if empty:
        raise DactLabError(f"{name}: the text column {header[col]!r} is empty at {_rows_list(empty)} (counting the "
                           "header as row 1): fill in the text or delete those rows.")
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def output_format(path: str | Path) -> str:
    suffix = Path(str(path)).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise DactLabError(f"Output {Path(str(path)).name}: unsupported format {suffix or '(no extension)'!r}; name "
                           "the output file .csv or .jsonl.")
    return suffix


def csv_columns(predictor) -> list[str]:
    """The output CSV's columns for a predictor (see the module's docstring)."""
    # "predicted_…", not "label": a predictions file beside a labelled input must not look like its gold labels
    if predictor.kind == "multitask":
        return ["text"] + [c for t in predictor.tasks for c in (f"{t}_predicted", f"{t}_probability")]
    return ["text", "predicted_label", "probability"] + (["exit_layer"] if predictor.kind == "dact" else [])


def csv_row(predictor, text: str, res: dict) -> dict:
    """One output CSV row (a dict of :func:`csv_columns`) from a text and its prediction."""
    row: dict[str, Any] = {"text": text}
    if predictor.kind == "multitask":
        tasks = res.get("tasks") or {predictor.tasks[0]: res}
        for t in predictor.tasks:
            row[f"{t}_predicted"], row[f"{t}_probability"] = tasks[t]["label"], round(float(tasks[t]["probability"]), 6)
        return row
    row["predicted_label"], row["probability"] = res["label"], round(float(res["probability"]), 6)
    if predictor.kind == "dact":
        row["exit_layer"] = res.get("exit_layer")
    return row


def json_row(text: str, res: dict) -> dict:
    """One output JSONL object: the text and its prediction (without the per-layer trace)."""
    out: dict[str, Any] = {"text": text}
    for k in ("label", "probability", "probabilities", "exit_layer", "tasks"):
        if k in res:
            out[k] = res[k]
    return out


def _chunk_size(batch_size: int) -> int:
    return max(1, batch_size) * 8  # texts per predict() call: sorted by length inside it, one progress step


def _predict_into(predictor, texts: list[str], emit: Callable[[str, dict], None], batch_size: int,
                  progress: Progress | None) -> None:
    total = len(texts)
    if progress is not None:
        progress(0, total)
    step = _chunk_size(batch_size)
    for start in range(0, total, step):
        chunk = texts[start:start + step]
        for text, res in zip(chunk, predictor.predict(chunk, batch_size=batch_size)):
            emit(text, res)
        if progress is not None:
            progress(min(start + step, total), total)


def check_output(output: str | Path, input_path: str | Path | None = None) -> None:
    """Refuse (before any prediction) an output that cannot be written: not .csv/.jsonl, a folder, in a missing or
    read-only folder, or the input file itself."""
    output = Path(output).expanduser()
    input_path = None if input_path is None else Path(input_path).expanduser()
    output_format(output)
    if output.is_dir():
        raise DactLabError(f"Output {output} is a folder: give a file name ending in .csv or .jsonl.")
    parent = output.parent
    if not parent.is_dir():
        raise DactLabError(f"The output's folder {parent} does not exist: create it first, or write elsewhere.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DactLabError(f"The output's folder {parent} is not writable: write the predictions elsewhere.")
    if input_path is not None and output.exists() and input_path.exists() and \
            os.path.samefile(output, input_path):
        raise DactLabError(f"The output {output} is the input file: give another output file name.")


def predict_file(predictor, input_path: str | Path, output_path: str | Path, *, batch_size: int = 32,
                 progress: Progress | None = None) -> dict:
    """Predict every text of ``input_path`` and write ``output_path`` (.csv or .jsonl), atomically.

    The input is read and validated completely before the first prediction; the output is written to a temporary
    file renamed into place at the end, so an error (a bad input, a failing model, a full disk) leaves no output
    file, or the existing one unchanged. ``progress(done, total)`` is called after each step. Returns ``{"rows",
    "seconds", "rows_per_s", "path"}`` (seconds: predicting and writing, not loading the model)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DactLabError(f"batch_size = {batch_size!r}: give a whole number >= 1.")
    inp, out = Path(input_path).expanduser(), Path(output_path).expanduser()
    fmt = output_format(out)
    check_output(out, inp)
    texts = read_texts(inp)
    t0 = time.perf_counter()
    if fmt == ".csv":
        columns = csv_columns(predictor)

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                _predict_into(predictor, texts, lambda t, r: writer.writerow(csv_row(predictor, t, r)), batch_size,
                              progress)
    else:
        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                def emit(text: str, result: dict) -> None:
                    fh.write(json.dumps(json_row(text, result), ensure_ascii=False) + "\n")

                _predict_into(predictor, texts, emit, batch_size, progress)
    atomic_write(out, write)
    seconds = time.perf_counter() - t0
    return {"rows": len(texts), "seconds": seconds, "rows_per_s": _rate(len(texts), seconds), "path": str(out)}


def _rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else math.inf


def predict_upload(predictor, name: str, data: bytes, *, batch_size: int = 32,
                   progress: Progress | None = None) -> dict:
    """An uploaded file's predictions (the Predict page): ``{"rows": [csv_row, ...], "csv": bytes (cells a
    spreadsheet would run as formulas escaped), "count", "seconds", "rows_per_s"}``. The upload is validated
    completely before any prediction, as :func:`predict_file` does."""
    texts = read_texts(name, data=data)
    t0 = time.perf_counter()
    rows: list[dict] = []
    _predict_into(predictor, texts, lambda t, r: rows.append(csv_row(predictor, t, r)), batch_size, progress)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "csv": rows_csv_bytes(rows, csv_columns(predictor)), "count": len(rows),
            "seconds": seconds, "rows_per_s": _rate(len(rows), seconds)}


def rows_csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    """Prediction rows as a CSV download (UTF-8): cells a spreadsheet would run as formulas get a leading '."""
    from ..data import spreadsheet_safe_csv

    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return spreadsheet_safe_csv(buf.getvalue().encode("utf-8"))
