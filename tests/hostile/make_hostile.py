"""Hostile CSV files for the input-robustness tests (issue 15, "Keep it proven").

``make_all(out_dir)`` writes every file of :data:`CASES` into ``out_dir`` and returns ``[(name, path, expectation)]``
where ``expectation`` is ``"accept"`` (a valid dataset: :func:`dact_lib.data.read_csv` must return it) or
``"refuse"`` (read_csv must raise a :class:`dact_lib.errors.DataError` whose message names the problem — the
case's ``problem`` pattern — and the fix). Run it as a script to look at the files::

    python tests/hostile/make_hostile.py /tmp/hostile

Everything is deterministic (no clock, a seeded RNG) and fast: the 1M-row file is a block of 1,000 lines repeated,
the over-the-limit file a block repeated to ``MAX_BYTES + 1`` bytes.
"""
from __future__ import annotations

import gzip
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dact_lib.data import MAX_BYTES  # noqa: E402

MILLION = 1_000_000
HUGE_CELL = 1024 * 1024  # 1 MiB
LONG_LABEL = 10_000
MANY_CLASSES = 3_000
WIDE = 2_000  # columns (read_csv costs ~0.6 ms per column: 10k columns took 6 s)


class Hostile(NamedTuple):
    name: str
    path: Path
    expectation: str  # "accept" | "refuse"


@dataclass(frozen=True)
class Case:
    """One hostile file. ``problem``: a regex (case-insensitive) the refusal message must match. For accepted files
    the optional ``rows`` / ``tasks`` / ``classes`` / ``warn`` (a regex one of the dataset's warnings matches) /
    ``text0`` (the first text) say what the dataset must look like."""

    name: str
    category: str
    expect: str
    build: Callable[[Path], None]
    problem: str = ""
    rows: int | None = None
    tasks: tuple[str, ...] | None = None
    classes: int | None = None
    warn: str | None = None
    text0: str | None = None
    big: bool = False  # too big for the page upload / many CLI runs (the 1M-row and over-limit files)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ helpers
TOPICS = ("pos", "neg")


def lines(n_per_class: int = 10, labels=TOPICS, header: str = "text,label", sep: str = ",",
          text: str = "review {i} says the thing was {lab}ish") -> list[str]:
    out = [header.replace(",", sep)]
    for i in range(n_per_class):
        for lab in labels:
            out.append(f"{text.format(i=i, lab=lab)}{sep}{lab}")
    return out


def csv_text(rows: list[str], eol: str = "\n") -> str:
    return eol.join(rows) + eol


def good(n_per_class: int = 10, **kw) -> bytes:
    return csv_text(lines(n_per_class, **kw)).encode("utf-8")


def const(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def text_file(text: str, encoding: str = "utf-8") -> Callable[[Path], None]:
    return const(text.encode(encoding))


def two_task(n: int = 10, header: str = "sentence,class_label,sentiment_label",
             row: Callable[[int, str, str], str] | None = None) -> str:
    out = [header]
    for i in range(n):
        for topic in ("sport", "food", "tech"):
            for senti in ("good", "bad"):
                out.append(row(i, topic, senti) if row else f"a {senti} {topic} story number {i},{topic},{senti}")
    return csv_text(out)


def write_million(path: Path) -> None:
    block = "".join(f"comment {i} was {('nice', 'awful')[i % 2]},{('pos', 'neg')[i % 2]}\n"
                    for i in range(1000)).encode()
    with path.open("wb") as f:
        f.write(b"text,label\n")
        for _ in range(MILLION // 1000):
            f.write(block)


def write_over_limit(path: Path) -> None:
    """A valid CSV of exactly MAX_BYTES + 1 bytes: only its size is wrong."""
    target = MAX_BYTES + 1
    block = good(500)[len(b"text,label\n"):]
    with path.open("wb") as f:
        f.write(b"text,label\n")
        written = len(b"text,label\n")
        while written + len(block) <= target:
            f.write(block)
            written += len(block)
        rest = target - written
        # pad the last row's text so the file stays valid CSV and ends with "\n"
        f.write(b"x" * (rest - len(b",pos\n")) + b",pos\n")


def wide_csv(columns: int, rows: int = 4) -> bytes:
    """``text,label`` plus ``columns`` extra (empty) columns: a small file with a very wide header."""
    head = "text,label," + ",".join(f"c{j}" for j in range(columns))
    body = "".join(f"row {i},{('a', 'b')[i % 2]}," + "," * (columns - 1) + "\n" for i in range(rows))
    return (head + "\n" + body).encode()


def make_dir(path: Path) -> None:
    path.mkdir(exist_ok=True)


def random_bytes(n: int, seed: int = 15) -> bytes:
    return random.Random(seed).randbytes(n)


def rows_with(cells: list[tuple[str, str]], header: str = "text,label", quote: bool = True) -> str:
    def q(s: str) -> str:
        if quote and any(c in s for c in ',"\n\r'):
            return '"' + s.replace('"', '""') + '"'
        return s

    return csv_text([header] + [f"{q(t)},{q(lab)}" for t, lab in cells])


def pad(cells: list[tuple[str, str]], n: int = 10) -> list[tuple[str, str]]:
    """``cells`` plus ``n`` ordinary rows of each of their labels (so each class has rows to split)."""
    labels = sorted({lab for _, lab in cells})
    return cells + [(f"ordinary sentence {i} for class {j}", lab) for i in range(n) for j, lab in enumerate(labels)]


# --------------------------------------------------------------------------------------------------------- cases
FORMULAS = ["=cmd|' /C calc'!A0", "+SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0", "@SUM(A1:A9)",
            "=HYPERLINK(\"http://evil.example\",\"click\")"]
HTML = ["<script>alert(1)</script>", "![x](http://evil.example/a.png)", "<img src=x onerror=alert(1)>",
        "[click](javascript:alert(1))", ":red[**big**] $\\LaTeX$ `code`"]


def _cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    R = "refuse"
    A = "accept"

    # --- not CSV / binary -----------------------------------------------------------------------------------------
    add(Case("not_csv_prose.txt", "not_csv", R, text_file("Dear team\nplease find the data attached\nthanks\n"),
             problem=r"delimiter"))
    add(Case("not_csv_one_long_line.csv", "not_csv", R, text_file("word " * 200_000 + "\n"), problem=r"delimiter"))
    add(Case("not_csv_json.csv", "not_csv", R,
             text_file('[{"text": "great film", "label": "pos"}, {"text": "awful", "label": "neg"}]\n'),
             problem=r"named \.csv but holds JSON.*rename it to \.json"))
    add(Case("not_csv_pipe_delimited.csv", "not_csv", R, const(good(sep="|")), problem=r"delimiter"))
    add(Case("not_csv_comment_first.csv", "not_csv", R,
             text_file("# exported by tool v1\n" + csv_text(lines())), problem=r"delimiter"))
    add(Case("not_a_file_folder.csv", "not_a_file", R, make_dir, problem=r"not a file"))
    add(Case("binary_random.bin", "binary", R, const(random_bytes(4096)), problem=r"binary"))
    add(Case("binary_xlsx.csv", "binary", R, const(b"PK\x03\x04\x14\x00\x06\x00" + random_bytes(2000, 1)),
             problem=r"binary"))
    add(Case("binary_xls_ole.csv", "binary", R, const(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + random_bytes(2000, 2)),
             problem=r"binary"))
    add(Case("binary_pdf.csv", "binary", R, const(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\n"),
             problem=r"binary"))
    add(Case("binary_png.csv", "binary", R,
             const(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"),
             problem=r"binary"))
    add(Case("binary_gzipped_csv.csv", "binary", R, const(gzip.compress(good(), mtime=0)), problem=r"binary"))

    # --- empty / header only --------------------------------------------------------------------------------------
    add(Case("empty.csv", "empty", R, const(b""), problem=r"empty"))
    add(Case("empty_blank_lines.csv", "empty", R, const(b"\n\n   \r\n\t\n"), problem=r"empty"))
    add(Case("empty_utf8_bom_only.csv", "empty", R, const(b"\xef\xbb\xbf"), problem=r"empty"))
    add(Case("empty_utf16_bom_only.csv", "empty", R, const(b"\xff\xfe"), problem=r"empty"))
    add(Case("header_only.csv", "header_only", R, const(b"text,label\n"), problem=r"no data rows"))
    add(Case("header_only_no_newline.csv", "header_only", R, const(b"text,label"), problem=r"no data rows"))
    add(Case("header_only_bom_crlf.csv", "header_only", R, const(b"\xef\xbb\xbftext,label\r\n\r\n"),
             problem=r"no data rows"))
    add(Case("header_and_blank_rows.csv", "header_only", R, const(b"text,label\n,\n , \n\n"),
             problem=r"no data rows"))

    # --- columns --------------------------------------------------------------------------------------------------
    add(Case("columns_wrong_names.csv", "columns", R, const(good(header="review,stars")),
             problem=r"no text column"))
    add(Case("columns_no_label.csv", "columns", R, const(good(header="text,score")), problem=r"no label column"))
    add(Case("columns_single.csv", "columns", R, text_file("text\nhello there\ngood bye\n"), problem=r"delimiter"))
    add(Case("columns_ambiguous_label.csv", "columns", R,
             text_file(csv_text(["text,label,category"] + [f"t {i},{('a', 'b')[i % 2]},c" for i in range(12)])),
             problem=r"ambiguous label"))
    add(Case("columns_ambiguous_text.csv", "columns", R,
             text_file(csv_text(["text,sentence,label"] + [f"t {i},s {i},{('a', 'b')[i % 2]}" for i in range(12)])),
             problem=r"ambiguous text"))
    add(Case("columns_duplicate.csv", "columns", R,
             text_file(csv_text(["text,label,label"] + [f"t {i},{('a', 'b')[i % 2]},x" for i in range(12)])),
             problem=r"duplicate"))
    add(Case("columns_duplicate_case.csv", "columns", R,
             text_file(csv_text(["Text,text,label"] + [f"t {i},u {i},{('a', 'b')[i % 2]}" for i in range(12)])),
             problem=r"duplicate"))
    add(Case("columns_html_header.csv", "columns", R,
             const(good(header="text,![x](http://evil.example/a.png)")), problem=r"no label column"))
    add(Case("columns_huge_header_cell.csv", "columns", R, const(good(header="text," + "h" * HUGE_CELL)),
             problem=r"no label column"))
    add(Case("columns_uppercase.csv", "columns", A, const(good(header="TEXT,LABEL")), rows=20, classes=2))
    add(Case("columns_padded_names.csv", "columns", A, const(good(header=" text , Label ")), rows=20, classes=2))
    add(Case("columns_extra.csv", "columns", A,
             text_file(csv_text(["id,text,label,notes"] + [f"{i},row {i} text,{('a', 'b')[i % 2]},n{i}"
                                                             for i in range(20)])), rows=20, classes=2))
    add(Case("columns_trailing_delimiter.csv", "columns", A,
             text_file(csv_text([r + "," for r in lines()])), rows=20, classes=2))
    add(Case("columns_2k_wide.csv", "columns", R, problem=r"2,002 columns.*at most 1,000", build=
             text_file(csv_text(["text,label," + ",".join(f"c{j}" for j in range(WIDE))]
                                + [f"row {i} text,{('a', 'b')[i % 2]}," + ",".join("0" * 1 for _ in range(WIDE))
                                   for i in range(20)])), rows=20, classes=2))
    add(Case("columns_quoted_header.csv", "columns", A,
             text_file(csv_text(['"text","label"'] + [f'"row {i} text","{("a", "b")[i % 2]}"' for i in range(20)])),
             rows=20, classes=2))

    # --- rows that do not fit the header --------------------------------------------------------------------------
    add(Case("rows_extra_field.csv", "parse", R,
             text_file(csv_text(lines() + ["one row, with an unquoted comma,pos"])), problem=r"read as csv"))
    add(Case("rows_stray_quote.csv", "parse", R,
             text_file(csv_text(lines()[:5] + ['"an unterminated quote,pos'] + lines()[5:])),
             problem=r"read as csv|quote"))
    add(Case("rows_missing_field.csv", "empty_cells", R, text_file(csv_text(lines() + ["no label here"])),
             problem=r"label column .* empty cells"))

    # --- empty cells ----------------------------------------------------------------------------------------------
    add(Case("cells_empty_text.csv", "empty_cells", R, text_file(csv_text(lines() + [",pos", ",neg"])),
             problem=r"text column .* empty cells"))
    add(Case("cells_empty_label.csv", "empty_cells", R, text_file(csv_text(lines() + ["orphan text,"])),
             problem=r"label column .* empty cells"))
    add(Case("cells_whitespace_text.csv", "empty_cells", R,
             text_file(csv_text(lines() + ["   ,pos", "\t,neg"])), problem=r"text column .* empty cells"))
    add(Case("cells_unicode_space_text.csv", "empty_cells", R,
             text_file(csv_text(lines() + ["\u00a0\u3000\u2003,pos"])), problem=r"text column .* empty cells"))
    add(Case("cells_whitespace_label.csv", "empty_cells", R, text_file(csv_text(lines() + ["some text,   "])),
             problem=r"label column .* empty cells"))
    add(Case("cells_numeric_text.csv", "numeric_text", R,
             text_file(csv_text(["text,label"] + [f"{1000 + i},{('a', 'b')[i % 2]}" for i in range(20)])),
             problem=r"numbers instead of text"))

    # --- classes --------------------------------------------------------------------------------------------------
    add(Case("classes_one.csv", "one_class", R, const(good(labels=("pos",))), problem=r"only 1 class"))
    add(Case("classes_one_after_strip.csv", "one_class", R,
             text_file(csv_text(["text,label"] + [f"row {i},{(' pos', 'pos ')[i % 2]}" for i in range(12)])),
             problem=r"only 1 class"))
    add(Case("classes_tiny_one_row_each.csv", "tiny_classes", A,
             text_file(csv_text(["text,label"] + [f"only row of class {k},c{k}" for k in range(6)])),
             rows=6, classes=6))
    add(Case("classes_two_rows_total.csv", "tiny_classes", A, text_file("text,label\ngood,pos\nbad,neg\n"),
             rows=2, classes=2))
    add(Case("classes_thousands.csv", "many_classes", A,
             text_file(csv_text(["text,label"] + [f"text {i} of class {k},class-{k}" for k in range(MANY_CLASSES)
                                                  for i in range(2)])), rows=2 * MANY_CLASSES, classes=MANY_CLASSES))
    add(Case("classes_numeric_labels.csv", "labels", A,
             text_file(csv_text(["text,label"] + [f"row {i} text,{(0, 1, 2, 10)[i % 4]}" for i in range(40)])),
             rows=40, classes=4, extra={"label_map": ["0", "1", "2", "10"]}))
    add(Case("classes_signed_float_labels.csv", "labels", A,
             text_file(csv_text(["text,label"] + [f"row {i} text,{('-1', '+1', '0.5')[i % 3]}" for i in range(24)])),
             rows=24, classes=3))
    add(Case("classes_na_null_labels.csv", "labels", A,
             text_file(csv_text(["text,label"] + [f"row {i} text,{('NA', 'null', 'NaN', 'None')[i % 4]}"
                                                  for i in range(40)])), rows=40, classes=4))
    add(Case("classes_long_labels_10k.csv", "labels", A,
             text_file(rows_with(pad([("first long one", "A" * LONG_LABEL), ("second long one", "B" * LONG_LABEL)]))),
             rows=22, classes=2))
    add(Case("classes_unicode_labels.csv", "labels", A,
             text_file(rows_with(pad([("emoji happy", "\U0001F600"), ("rtl override", "\u202eevil\u202c"),
                                      ("accent", "caf\u00e9")]))), rows=33, classes=3))
    add(Case("classes_terminal_escape_labels.csv", "labels", A,
             text_file(rows_with(pad([("escape red", "\x1b[31mred\x1b[0m"), ("bell", "ding\x07"),
                                      ("title", "\x1b]0;pwned\x07x")]))), rows=33, classes=3))

    # --- formula / HTML / markdown cells --------------------------------------------------------------------------
    add(Case("inject_formula_text.csv", "inject", A,
             text_file(rows_with(pad([(f, ("pos", "neg")[i % 2]) for i, f in enumerate(FORMULAS)]))),
             rows=25, classes=2))
    add(Case("inject_formula_labels.csv", "inject", A,
             text_file(rows_with(pad([(f"text {i}", f) for i, f in enumerate(FORMULAS[:4])]))),
             rows=44, classes=4))
    add(Case("inject_html_text.csv", "inject", A,
             text_file(rows_with(pad([(h, ("pos", "neg")[i % 2]) for i, h in enumerate(HTML)]))),
             rows=25, classes=2))
    add(Case("inject_html_labels.csv", "inject", A,
             text_file(rows_with(pad([(f"text {i}", h) for i, h in enumerate(HTML)]))), rows=55, classes=5))

    # --- huge / large ---------------------------------------------------------------------------------------------
    add(Case("huge_text_cell_1mb.csv", "huge", A,
             text_file(rows_with(pad([(("w" * 7 + " ") * (HUGE_CELL // 8), "pos"), ("small", "neg")]))),
             rows=22, classes=2))
    add(Case("huge_label_cell_1mb.csv", "huge", A,
             text_file(rows_with([(f"text {i}", "L" * HUGE_CELL if i < 3 else "short") for i in range(14)])),
             rows=14, classes=2))
    add(Case("large_1m_rows.csv", "large", A, write_million, rows=MILLION, classes=2, big=True))
    add(Case("large_over_size_limit.csv", "size", R, write_over_limit, problem=r"over the limit", big=True))

    # --- encodings / BOMs -----------------------------------------------------------------------------------------
    enc_rows = pad([("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", "pos"), ("na\u00efve d\u00e9j\u00e0 vu", "neg")])
    add(Case("enc_latin1.csv", "encoding", A, text_file(rows_with(enc_rows), "latin-1"), rows=22, classes=2,
             warn=r"latin-1", text0="caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"))
    smart = "\u201cgreat\u201d \u2013 it\u2019s \u20ac5"
    add(Case("enc_cp1252_smart_quotes.csv", "encoding", A,
             text_file(rows_with(pad([(smart, "pos"), ("\u2018meh\u2019", "neg")])), "cp1252"), rows=22, classes=2,
             warn=r"latin-1", text0=smart))
    add(Case("enc_utf16_le_bom.csv", "encoding", A, text_file(rows_with(enc_rows), "utf-16"), rows=22, classes=2,
             text0="caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"))
    add(Case("enc_utf16_be_bom.csv", "encoding", A,
             const(b"\xfe\xff" + rows_with(enc_rows).encode("utf-16-be")), rows=22, classes=2,
             text0="caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"))
    add(Case("enc_utf16_no_bom.csv", "encoding", R, text_file(rows_with(enc_rows), "utf-16-le"),
             problem=r"binary|utf"))
    add(Case("enc_utf32_bom.csv", "encoding", A, text_file(rows_with(enc_rows), "utf-32"), rows=22, classes=2,
             text0="caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"))  # a UTF-32 file with its BOM is text
    add(Case("enc_invalid_utf8_bytes.csv", "encoding", A,
             const(good(6) + b"bad \xff\xfe bytes \xc3\x28 here,pos\nmore \x81\x8d\x90 bytes,neg\n"),
             rows=14, classes=2, warn=r"latin-1"))
    add(Case("enc_utf8_bom.csv", "encoding", A, const(b"\xef\xbb\xbf" + good()), rows=20, classes=2))
    add(Case("enc_double_bom.csv", "encoding", A, const(b"\xef\xbb\xbf\xef\xbb\xbf" + good()), rows=20, classes=2))
    add(Case("enc_surrogate_bytes.csv", "encoding", A, const(good(6) + b"lone \xed\xa0\x80 surrogate,pos\n"),
             rows=13, classes=2, warn=r"latin-1"))

    # --- delimiters / line ends / quoting -------------------------------------------------------------------------
    add(Case("delim_semicolon.csv", "delimiters", A, const(good(sep=";")), rows=20, classes=2))
    add(Case("delim_tab.tsv", "delimiters", A, const(good(sep="\t")), rows=20, classes=2))
    add(Case("delim_mixed_rows.csv", "delimiters", R, text_file(csv_text(lines() + ["semicolon row;neg"])),
             problem=r"label column .* empty cells"))
    add(Case("delim_mixed_header.csv", "delimiters", R,
             text_file(csv_text(["text;label,notes"] + [f"row {i};{('a', 'b')[i % 2]},n" for i in range(12)])),
             problem=r"column"))
    add(Case("delim_excel_sep_line.csv", "delimiters", R, text_file("sep=;\n" + csv_text(lines(sep=";"))),
             problem=r"column|read as csv"))
    add(Case("delim_comma_in_quoted_text.csv", "delimiters", A,
             text_file(rows_with(pad([("hello, world, again", "pos"), ('he said "hi", then left', "neg")]))),
             rows=22, classes=2, text0="hello, world, again"))
    add(Case("lines_crlf.csv", "line_ends", A, const(csv_text(lines(), "\r\n").encode()), rows=20, classes=2))
    add(Case("lines_cr_only.csv", "line_ends", A, const(csv_text(lines(), "\r").encode()), rows=20, classes=2))
    add(Case("lines_mixed.csv", "line_ends", A,
             const("".join(r + ("\n", "\r\n")[i % 2] for i, r in enumerate(lines())).encode()), rows=20, classes=2))
    add(Case("lines_leading_blank.csv", "line_ends", A, const(b"\n\n\r\n" + good()), rows=20, classes=2))
    add(Case("quoted_newlines.csv", "quoting", A,
             text_file(rows_with(pad([("line one\nline two\n\nline four", "pos"), ("crlf\r\ninside", "neg")]))),
             rows=22, classes=2, text0="line one\nline two\n\nline four"))

    # --- NUL bytes / control characters ---------------------------------------------------------------------------
    add(Case("nul_in_cell.csv", "nul", R, const(good(6) + b"hello\x00world,pos\n"), problem=r"binary"))
    add(Case("nul_after_64k.csv", "nul", R, const(good(2000) + b"late\x00nul,pos\n"), problem=r"binary|nul"))
    add(Case("control_chars_text.csv", "labels", A,
             text_file(rows_with(pad([("bell\x07 and \x1b[2J clear", "pos"), ("form\x0cfeed", "neg")]))),
             rows=22, classes=2))

    # --- two-task files -------------------------------------------------------------------------------------------
    add(Case("two_task_ok.csv", "two_task", A, text_file(two_task()), rows=60,
             tasks=("class_label", "sentiment_label")))
    add(Case("two_task_no_sentiment.csv", "two_task", A,
             text_file(two_task(header="sentence,class_label",
                                row=lambda i, t, s: f"a {s} {t} story number {i},{t}")), rows=60, tasks=("label",),
             classes=3))
    add(Case("two_task_no_class.csv", "two_task", R,
             text_file(two_task(header="sentence,sentiment_label",
                                row=lambda i, t, s: f"a {s} {t} story number {i},{s}")), problem=r"no label column"))
    add(Case("two_task_no_sentence.csv", "two_task", R,
             text_file(two_task(header="class_label,sentiment_label", row=lambda i, t, s: f"{t},{s}")),
             problem=r"no text column"))
    add(Case("two_task_empty_sentiment.csv", "two_task", R,
             text_file(two_task() + "one more food story,food,\n"), problem=r"sentiment_label.* empty cells"))
    add(Case("two_task_one_sentiment.csv", "two_task", R,
             text_file(two_task(row=lambda i, t, s: f"a {s} {t} story number {i},{t},good")),
             problem=r"sentiment_label.*only 1 class"))
    add(Case("two_task_ragged.csv", "two_task", R,
             text_file(two_task() + "a story, with a comma,food,good\n"), problem=r"read as csv"))
    return c


CASES: dict[str, Case] = {case.name: case for case in _cases()}


def make_all(out_dir) -> list[Hostile]:
    """Write every hostile file into ``out_dir`` (created) and return ``[(name, path, expectation)]``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for case in CASES.values():
        path = out / case.name
        case.build(path)
        made.append(Hostile(case.name, path, case.expect))
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/hostile/make_hostile.py OUT_DIR", file=sys.stderr)
        return 2
    made = make_all(argv[0])
    for name, path, expectation in made:
        print(f"{expectation:<7} {CASES[name].category:<13} {path.stat().st_size:>10,}  {name}")
    n_acc = sum(m.expectation == "accept" for m in made)
    print(f"{len(made)} files in {argv[0]}: {n_acc} to accept, {len(made) - n_acc} to refuse")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
