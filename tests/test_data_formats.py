"""Data formats (issue 26, item 3): JSON Lines, JSON, Parquet, TSV and a pandas DataFrame go through read_csv's one
validation with the CSV's messages; a file that is none of the formats is named and the fix given — in the library,
the CLI (``--data FILE``) and the Data page's uploader."""
from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dact_lib.data import (FORMATS, UPLOAD_TYPES, IncompleteRowsError, csv_header, csv_rows, format_of,
                           load_demo_dataset, read_csv)
from dact_lib.errors import DataError
from test_app_pages import app_home, errors, goto, open_app  # noqa: F401 - app_home is a fixture

ONE = pd.DataFrame({"text": ["a fine film", "a dull plot", "lovely acting", "awful sound", "great fun", "so slow"],
                    "label": ["pos", "neg", "pos", "neg", "pos", "neg"]})


def write(df: pd.DataFrame, path: Path, fmt: str) -> Path:
    """``df`` as a file of format ``fmt`` the way a practitioner writes it with pandas."""
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "json":
        df.to_json(path, orient="records", force_ascii=False)
    elif fmt in ("json-columns", "json-split", "json-table"):
        df.to_json(path, orient=fmt.split("-")[1])
    elif fmt == "parquet":
        df.to_parquet(path)
    return path


def message(source, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_csv(source, **kwargs)
    return str(info.value)


SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "json": ".json", "json-columns": ".json",
          "json-split": ".json", "json-table": ".json", "parquet": ".parquet"}


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_format_reads_the_two_task_demo_back_equal(fmt, tmp_path):
    demo = load_demo_dataset()
    path = write(demo.to_frame(), tmp_path / f"demo{SUFFIX[fmt]}", fmt)
    ds = read_csv(path)
    assert ds == demo and ds.tasks == ["class_label", "sentiment_label"]
    assert ds.columns == {"sentence": "sentence", "class_label": "class_label", "sentiment_label": "sentiment_label"}
    assert ds.name == "demo" and ds.warnings == []
    # the same bytes without a name: the content decides (Parquet's magic, JSON, else CSV)
    assert read_csv(path.read_bytes()) == demo
    # an open file: its name decides
    with open(path, "rb") as fh:
        assert read_csv(fh) == demo


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "tsv"])
def test_single_task_with_aliases_numbers_and_a_column_mapping(fmt, tmp_path):
    df = pd.DataFrame({"Sentence": ONE["text"], "stars": [5, 1, 4, 2, 5, 1], "id": range(6)})
    path = write(df, tmp_path / f"d{SUFFIX[fmt]}", fmt)
    ds = read_csv(path, columns={"text": "Sentence", "label": "stars"})
    assert ds.texts == list(ONE["text"]) and ds.tasks == ["label"]
    assert ds.label_maps["label"] == ["1", "2", "4", "5"]  # numbers become their text, sorted numerically
    assert ds.targets["label"].tolist() == [3, 0, 2, 1, 3, 0]
    assert csv_header(path.read_bytes(), format=fmt) == ["Sentence", "stars", "id"]


def test_a_dataframe_is_read_like_a_file_and_hashes_like_its_csv(tmp_path):
    ds = read_csv(ONE)
    assert ds == read_csv(write(ONE, tmp_path / "one.csv", "csv")) and ds.name == "dataframe"
    assert ds.content_hash == read_csv(ONE.copy()).content_hash
    assert read_csv(ONE, name="mine").name == "mine"
    two = load_demo_dataset().to_frame()
    assert read_csv(two) == load_demo_dataset()
    ints = pd.DataFrame({"text": ONE["text"], "label": np.array([0, 1, 0, 1, 0, 1], dtype=np.int64)})
    assert read_csv(ints).label_maps == {"label": ["0", "1"]}


def test_json_values_nulls_and_missing_keys_become_cells(tmp_path):
    rows = [{"text": "a fine film", "label": True}, {"text": "a dull plot", "label": False},
            {"text": 645, "label": True, "extra": [1, 2]}]
    with pytest.raises(DataError) as info:  # a list in any column is refused, naming the field and the record
        read_csv(json.dumps(rows).encode(), format="json")
    assert str(info.value) == ("The field 'extra' of record 3 holds a list: text and label fields must be strings (or "
                               "numbers). Flatten the data so that every record has plain text and label values.")
    rows[2].pop("extra")
    rows += [{"text": f"more text {i}", "label": i % 2 == 0} for i in range(200)]
    ds = read_csv(json.dumps(rows).encode())
    assert ds.label_maps["label"] == ["false", "true"] and ds.texts[2] == "645"
    assert any("holds only a number at record 3" in w for w in ds.warnings)
    gaps = [{"text": "a fine film", "label": "pos"}, {"text": "a dull plot"}, {"text": None, "label": "neg"}]
    with pytest.raises(IncompleteRowsError) as info:
        read_csv(json.dumps(gaps).encode())
    assert str(info.value) == ("The text column 'text' has empty cells at record 3: fill in the text or delete those "
                               "rows.") and info.value.rows == [2, 3]


# ------------------------------------------------------------------------------- the same messages as the CSV
def test_every_format_gives_the_csvs_message_with_its_own_row_numbers(tmp_path):
    df = ONE.copy()
    df.loc[2, "label"] = ""
    df.loc[4, "label"] = None
    expected = {
        "csv": "rows 4, 6 (counting the header as row 1)", "tsv": "rows 4, 6 (counting the header as row 1)",
        "jsonl": "lines 3, 5", "json": "records 3, 5", "parquet": "rows 3, 5"}
    for fmt, where in expected.items():
        with pytest.raises(IncompleteRowsError) as info:
            read_csv(write(df, tmp_path / f"gaps{SUFFIX[fmt]}", fmt))
        assert str(info.value) == (f"The label column 'label' has empty cells at {where}: give every row a class or "
                                   "delete those rows."), fmt
        # the Data page shows those rows (csv_rows), found by the numbers the error gives
        raw = (tmp_path / f"gaps{SUFFIX[fmt]}").read_bytes()
        shown = csv_rows(raw, info.value.rows, format=fmt)
        assert list(shown["text"]) == ["lovely acting", "great fun"], fmt
        kept = read_csv(raw, format=fmt, drop_incomplete=True)
        assert len(kept) == 4 and f"left out 2 row(s) with an empty text or label cell at {where}." in kept.warnings
    one_class = ONE.assign(label="pos")
    msgs = {fmt: message(write(one_class, tmp_path / f"one{SUFFIX[fmt]}", fmt)) for fmt in ("csv", "jsonl", "parquet")}
    assert len(set(msgs.values())) == 1 and "has only 1 class" in msgs["csv"]
    wrong = ONE.rename(columns={"label": "stars"})
    msgs = {fmt: message(write(wrong, tmp_path / f"w{SUFFIX[fmt]}", fmt)) for fmt in ("csv", "json", "parquet")}
    assert len(set(msgs.values())) == 1 and msgs["csv"].startswith("No label column found. The file's columns are "
                                                                   "'text', 'stars'")


def test_a_jsonl_line_blank_lines_and_line_numbers(tmp_path):
    raw = b'{"text": "a fine film", "label": "pos"}\n\n{"text": "a dull plot", "label": "neg"}\n{"text": "x", oops}\n'
    msg = message(raw, format="jsonl")
    assert msg.startswith("Line 4 of the JSON Lines file is not valid JSON (Expecting property name enclosed in "
                          "double quotes, column 15): put one JSON object per line")
    assert "double quotes, or export the file again as CSV" not in msg  # the old CSV advice is gone
    path = tmp_path / "t.jsonl"
    path.write_bytes(raw.replace(b'{"text": "x", oops}', b'{"text": "", "label": "neg"}'))
    with pytest.raises(IncompleteRowsError) as info:
        read_csv(path)
    assert "empty cells at line 4:" in str(info.value) and info.value.rows == [4]
    assert message(b'[{"text": "a", "label": "b"}]\n', format="jsonl") == (
        "The JSON Lines file holds one JSON list, not one object per line: rename it to .json, or write one object "
        "per line (df.to_json(path, orient='records', lines=True)).")
    pretty = ONE.to_json(orient="records", indent=2).encode()  # a .json file saved as .jsonl
    assert message(pretty, format="jsonl").endswith(
        "The file holds one JSON document (a list), not one object per line: rename it to .json.")
    assert message(b'{"text": "a"}\n["a list"]\n', format="jsonl") == (
        'Line 2 of the JSON Lines file is a list, not an object: every line must be one JSON object such as '
        '{"text": "a fine film", "label": "pos"}.')


# -------------------------------------------------------------------------- what a file is when it is none
def test_a_json_object_that_is_not_records_names_its_keys_and_the_list_inside():
    doc = {"meta": {"source": "web"}, "rows": [{"text": "a", "label": "b"}] * 3}
    assert message(json.dumps(doc).encode(), format="json") == (
        "The JSON file holds an object (keys 'meta', 'rows'), not a list of records: save a list such as "
        "[{\"text\": \"a fine film\", \"label\": \"pos\"}, ...], e.g. with pandas: df.to_json(path, "
        "orient='records'). Its key 'rows' holds a list of 3 records: save that list alone.")
    assert message(b'"just a string"', format="json").startswith("The JSON file holds a string, not a list")
    assert message(b'{"text": "a", "label": "b"}\n{"text": "c", "label": "d"}\n', format="json") == (
        "The JSON file holds one JSON object per line (JSON Lines), not one document: rename it to .jsonl.")
    assert message(b'[{"text": "a", ', format="json").startswith("The file is not valid JSON (Expecting")


def test_content_that_contradicts_the_name_or_is_no_format_is_named(tmp_path):
    parquet = io.BytesIO()
    ONE.to_parquet(parquet)
    records = ONE.to_json(orient="records").encode()
    lines = ONE.to_json(orient="records", lines=True).encode()
    xlsx = io.BytesIO()
    with zipfile.ZipFile(xlsx, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("data.csv", "text,label\n")
    cases = {
        # the name says CSV, the content is something else: the old messages blamed quotes or Excel
        ("data.csv", parquet.getvalue()): "The file is named .csv but is a Parquet file (binary): rename it to "
                                          ".parquet.",
        ("data.csv", records): "The file is named .csv but holds JSON (one JSON document), not CSV with a header "
                               "row: rename it to .json.",
        ("data.txt", lines): "The file is named .txt but holds JSON (one JSON object per line), not CSV with a "
                             "header row: rename it to .jsonl.",
        ("data.parquet", ONE.to_csv(index=False).encode()): "The file is named .parquet but is not a Parquet file "
                                                             "(it does not start with PAR1): write it again with "
                                                             "df.to_parquet(path), or rename it to what it is (.csv, "
                                                             ".jsonl, .json).",
        ("data.parquet", lines): "The file is named .parquet but holds JSON Lines (.jsonl), not Parquet: rename it "
                                 "to .jsonl.",
        ("book.xlsx", xlsx.getvalue()): "The file is a binary Excel workbook (.xlsx), not CSV, TSV, JSON Lines "
                                        "(.jsonl), JSON (.json: a list of records) or Parquet: open it in Excel (or "
                                        "pandas.read_excel) and export it as CSV (UTF-8), JSON Lines or Parquet, e.g. "
                                        "with pandas: df.to_csv(path, index=False), df.to_json(path, "
                                        "orient='records', lines=True) or df.to_parquet(path).",
        ("data.csv.gz", gzip.compress(b"text,label\n", mtime=0)): "The file is gzip-compressed (binary), not CSV, TSV, "
                                                                  "JSON Lines (.jsonl), JSON (.json: a list of "
                                                                  "records) or Parquet: decompress it first (gunzip "
                                                                  "FILE.gz, or 7-Zip) and give the file inside.",
        ("page.csv", b"<!DOCTYPE html>\n<html><body><table></table></body></html>\n"):
            "The file is an HTML page, not data: download the data file itself (on GitHub, the Raw button; elsewhere "
            "the download link), not the web page that shows it.",
    }
    for (name, raw), expected in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        assert message(path) == expected, name
    # bytes with format= (no file name): the fix is the format to read it with
    assert message(records, format="csv") == ("The file is read as CSV (format='csv') but holds JSON (one JSON "
                                              "document), not CSV with a header row: read it with format='json'.")
    assert message(parquet.getvalue(), format="jsonl") == ("The file is read as JSON Lines (format='jsonl') but is a "
                                                           "Parquet file (binary): read it with format='parquet'.")
    path = tmp_path / "archive.zip"
    path.write_bytes(plain_zip.getvalue())
    assert "a binary zip archive" in message(path) and "unzip it" in message(path)
    bad_parquet = tmp_path / "cut.parquet"
    bad_parquet.write_bytes(parquet.getvalue()[:40])
    assert message(bad_parquet).startswith("The file could not be read as Parquet (")
    assert message(ONE.to_csv().encode(), format="xlsx") == (
        "Unknown data format 'xlsx': use one of csv, tsv, jsonl, json, parquet (or leave it out to go by the file's "
        "name and content).")


def test_formats_and_uploader_types_agree():
    assert FORMATS == ("csv", "tsv", "jsonl", "json", "parquet")
    assert {format_of(f"x.{t}") for t in UPLOAD_TYPES} == set(FORMATS)
    assert format_of("x.JSONL") == "jsonl" and format_of("x.xlsx") is None and format_of(None) is None
    src = Path(__file__).resolve().parent.parent / "app_pages" / "data.py"
    assert "type=UPLOAD_TYPES" in src.read_text()


# -------------------------------------------------------------------------------------------- CLI and page
def test_cli_trains_on_a_jsonl_file_and_refuses_a_bad_one(home, capsys, tmp_path):
    from dact_lib.cli import main
    from dact_lib.tracker import Tracker

    demo = load_demo_dataset()
    path = write(demo.to_frame(), tmp_path / "demo.jsonl", "jsonl")
    code = main(["train", "--data", str(path), "--encoder", "tiny", "--max-rows", "120", "--epochs", "1",
                 "--device", "cpu", "--home", str(home), "--verbosity", "0"])
    assert code == 0, capsys.readouterr().err
    (stored,) = Tracker(home).list_datasets()
    assert stored["rows"] == 120 and stored["tasks"] == ["class_label", "sentiment_label"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": demo.to_frame().to_dict(orient="records")}))
    code = main(["train", "--data", str(bad), "--encoder", "tiny", "--home", str(home)])
    err = capsys.readouterr().err
    assert code != 0 and "Its key 'rows' holds a list of 405 records: save that list alone." in err
    assert "Traceback" not in err and len(Tracker(home).list_datasets()) == 1


def test_data_page_uploads_jsonl_and_parquet_and_names_a_bad_json(app_home):  # noqa: F811 - the fixture
    from dact_lib.tracker import Tracker

    at = goto(open_app(), "app_pages/data.py")
    bad = json.dumps({"meta": 1, "rows": []}).encode()
    at.file_uploader(key="data:upload").upload("bad.json", bad, "application/json")
    at.run()
    (err,) = errors(at)
    assert err.startswith("The JSON file holds an object (keys 'meta', 'rows'), not a list of records")
    assert not any(b.key == "data:save" for b in at.button)

    gaps = ONE.copy()
    gaps.loc[3, "text"] = ""
    at.file_uploader(key="data:upload").set_value(("gaps.jsonl", gaps.to_json(orient="records", lines=True).encode(),
                                                   "application/json"))
    at.run()
    assert any("empty cells at line 4" in e for e in errors(at))
    assert list(at.dataframe[0].value["line"]) == [4]  # the row a fix would drop, found in the JSON Lines file
    at.button(key="data:drop").click().run()
    at.button(key="data:save").click().run()
    assert [d["rows"] for d in Tracker(app_home).list_datasets()] == [5]

    buf = io.BytesIO()
    load_demo_dataset().to_frame().to_parquet(buf)
    at.file_uploader(key="data:upload").set_value(("demo.parquet", buf.getvalue(), "application/octet-stream"))
    at.run()
    assert not errors(at), errors(at)
    at.button(key="data:save").click().run()
    stored = Tracker(app_home).list_datasets()
    assert sorted(d["rows"] for d in stored) == [5, 405]
    demo_id = next(d["id"] for d in stored if d["rows"] == 405)
    assert Tracker(app_home).load_dataset(demo_id) == load_demo_dataset()
