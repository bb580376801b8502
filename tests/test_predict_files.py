"""deploy/predict_files.py: reading texts from .csv/.tsv/.jsonl/.txt (every bad row named before any prediction),
predicting a file into .csv/.jsonl atomically, and `predict --input F --output P` end to end (tiny-encoder runs)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from dact_lib.cli import main
from dact_lib.deploy.predict_files import (TEXT_COLUMNS, csv_columns, predict_file, predict_upload, read_texts,
                                           rows_csv_bytes)
from dact_lib.deploy.predictor import load_predictor
from dact_lib.errors import DactLabError
from deploy_runs import tiny_run

TEXTS = ["sunny rain today", "the goal and the match", "pasta soup cheese", "a storm and snow, then wind",
         "the coach said \"again\"", "bread\nand salad"]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def csv_text(texts, header=("id", "text", "label"), sep=",") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep, lineterminator="\n")
    w.writerow(header)
    for i, t in enumerate(texts):
        w.writerow([str(i) if h == "id" else t if h.lower() in TEXT_COLUMNS or len(header) == 1 else "x"
                    for h in header])
    return buf.getvalue()


@pytest.fixture(scope="module")
def dact():
    home, run = tiny_run("dact")
    return home, run, load_predictor(run=run, home=home)


# --------------------------------------------------------------------------------------------- reading


def test_text_columns_are_the_ones_read_csv_accepts():
    from dact_lib.data import TEXT_NAMES

    assert TEXT_COLUMNS == TEXT_NAMES


def test_read_texts_in_every_format(tmp_path):
    assert read_texts(write(tmp_path / "a.csv", csv_text(TEXTS) + "\n\n")) == TEXTS  # trailing empty lines skipped
    assert read_texts(write(tmp_path / "b.tsv", csv_text(TEXTS, sep="\t"))) == TEXTS
    assert read_texts(write(tmp_path / "c.csv", csv_text(TEXTS, header=("Sentence", "label"), sep=";"))) == TEXTS
    assert read_texts(write(tmp_path / "d.csv", csv_text(TEXTS, header=("review",)))) == TEXTS  # the only column
    # a one-column file is not split on commas: "a storm and snow, then wind" stays one text
    assert read_texts(write(tmp_path / "e.csv", "review\nfirst, with a comma\nsecond\n")) == \
        ["first, with a comma", "second"]
    lines = [json.dumps({"text": TEXTS[0], "id": 1}), "", json.dumps(TEXTS[1]), json.dumps({"sentence": TEXTS[2]})]
    assert read_texts(write(tmp_path / "f.jsonl", "\n".join(lines) + "\n")) == TEXTS[:3]
    assert read_texts(write(tmp_path / "g.txt", "first line\r\n\r\n  second line  \r\nthird")) == \
        ["first line", "second line", "third"]  # CRLF, blank lines skipped, texts stripped
    bom = "\ufefftext,label\nhéllo wörld,a\n".encode("utf-8")
    assert read_texts(write(tmp_path / "h.csv", bom)) == ["héllo wörld"]
    assert read_texts("upload.TXT", data=b"one\ntwo\n") == ["one", "two"]  # bytes of an upload, named


@pytest.mark.parametrize("name, content, expect", [
    ("blank.csv", "text,label\ngood one,a\n   ,b\nfine,a\n,c\n", ["rows 3, 5", "counting the header as row 1",
                                                                  "fill in the text or delete those rows"]),
    ("nocol.csv", "review,stars\ngood,5\n", ["no text column", "'review', 'stars'", "Name the text column"]),
    ("two.csv", "text,sentence\na,b\n", ["several text columns", "keep one"]),
    ("ragged.csv", "text,label\nhello, world,a\n", ["more cells than its header", "row 2", "double quotes"]),
    ("quote.csv", 'text,label\n"unclosed,a\nnext,b\n', ["cannot be read as CSV", "double quote"]),
    ("header.csv", "text,label\n", ["holds no text", "below the header row"]),
    ("empty.txt", "\n  \n", ["holds no text", "one per line"]),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "broken\n', ["line 2 is not valid JSON", "one JSON object per line"]),
    ("num.jsonl", '{"text": "ok"}\n\n{"text": 5}\n', ["line 3", "is a int, not a string"]),
    ("blank.jsonl", '{"text": "ok"}\n{"text": "  "}\n', ["line 2", "empty text", "delete the line"]),
    ("nokey.jsonl", '{"body": "ok"}\n', ["line 1 has no text field", "'body'", "\"text\" key"]),
    ("list.jsonl", '["a"]\n', ["line 1 is a list, not a string"]),
    ("digits.jsonl", '{"text": "ok"}\n{"n": ' + "1" * 5000 + '}\n', ["line 2 cannot be read", "digits"]),  # was an AttributeError
    ("surrogate.jsonl", '{"text": "ok"}\n{"text": "bad \\ud800"}\n', ["line 2", "lone surrogate"]),  # was a traceback
    ("data.xlsx", "x", ["unsupported input format '.xlsx'", ".csv or .tsv"]),
    ("bin.csv", b"PK\x03\x04\x00\x00binary", ["binary file", "save it as CSV"]),
])
def test_bad_input_is_named_with_its_row_and_fix(tmp_path, name, content, expect):
    with pytest.raises(DactLabError) as exc:
        read_texts(write(tmp_path / name, content))
    for part in expect:
        assert part in str(exc.value), str(exc.value)


def test_a_missing_input_file(tmp_path):
    with pytest.raises(DactLabError, match="does not exist: check the path"):
        read_texts(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------- predicting files


@pytest.mark.parametrize("fmt, content", [
    ("csv", csv_text(TEXTS)), ("jsonl", "\n".join(json.dumps({"text": t}) for t in TEXTS)),
    ("txt", "\n".join(t.replace("\n", " ") for t in TEXTS)),
])
@pytest.mark.parametrize("out_fmt", ["csv", "jsonl"])
def test_a_file_round_trips_with_the_models_labels(dact, tmp_path, fmt, content, out_fmt):
    from dact_lib.models import load_model, predict

    home, run, predictor = dact
    inp = write(tmp_path / f"in.{fmt}", content)
    out = tmp_path / f"preds.{out_fmt}"
    steps = []
    got = predict_file(predictor, inp, out, batch_size=2, progress=lambda d, t: steps.append((d, t)))
    texts = read_texts(inp)
    assert got["rows"] == len(texts) == len(TEXTS) and got["rows_per_s"] > 0 and got["path"] == str(out)
    assert steps[0] == (0, len(texts)) and steps[-1] == (len(texts), len(texts))
    if out_fmt == "csv":
        with out.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["text", "predicted_label", "probability", "exit_layer"]  # not the gold "label"
        for r in rows:
            r["label"] = r.pop("predicted_label")
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert set(rows[0]) == {"text", "label", "probability", "probabilities", "exit_layer"}
    assert [r["text"] for r in rows] == texts  # one row per text, in the input's order
    expected = predict(load_model(run, home, "cpu"), texts)  # all at once, unsorted: the same answers
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert [int(r["exit_layer"]) for r in rows] == [e["exit_layer"] for e in expected]
    assert all(1 <= int(r["exit_layer"]) <= 2 for r in rows)
    assert [round(float(r["probability"]), 4) for r in rows] == [round(e["probability"], 4) for e in expected]


def test_a_bad_row_writes_nothing_and_keeps_an_existing_output(dact, tmp_path):
    _, _, predictor = dact
    calls = []
    real = predictor.predict

    class Spy:  # the predictor, counting its calls: validation comes before any prediction
        kind, tasks, labels = predictor.kind, predictor.tasks, predictor.labels

        def predict(self, texts, **kw):
            calls.append(len(texts))
            return real(texts, **kw)

    bad = write(tmp_path / "bad.csv", "text\nfine\n\"\"\nalso fine\n")
    out = tmp_path / "preds.csv"
    with pytest.raises(DactLabError, match="row 3"):
        predict_file(Spy(), bad, out)
    assert not out.exists() and calls == []
    bad_json = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{text: oops}\n')
    with pytest.raises(DactLabError, match="line 2 is not valid JSON"):
        predict_file(Spy(), bad_json, tmp_path / "preds.jsonl")
    assert not (tmp_path / "preds.jsonl").exists() and calls == []

    out.write_text("precious,old\n")  # an existing output survives a bad input and a failure mid-way
    with pytest.raises(DactLabError):
        predict_file(Spy(), bad, out)
    big = write(tmp_path / "big.txt", "\n".join(f"text number {i}" for i in range(40)))

    class Failing(Spy):
        def predict(self, texts, **kw):
            if calls:
                raise RuntimeError("the model broke on the second step")
            return super().predict(texts, **kw)

    with pytest.raises(RuntimeError, match="second step"):
        predict_file(Failing(), big, out, batch_size=2)  # 16 texts per step: fails in the middle
    assert calls == [16] and out.read_text() == "precious,old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "bad.jsonl", "big.txt", "preds.csv"]  # no temp


def test_outputs_that_cannot_be_written_are_refused_first(dact, tmp_path):
    _, _, predictor = dact
    inp = write(tmp_path / "in.txt", "hello\n")
    for out, msg in ((tmp_path / "p.xlsx", "name the output file .csv or .jsonl"),
                     (tmp_path / "missing" / "p.csv", "does not exist: create it first"),
                     (tmp_path, "unsupported format"), (inp, "unsupported format")):
        with pytest.raises(DactLabError, match=msg):
            predict_file(predictor, inp, out)
    same = write(tmp_path / "in.csv", "text\nhello\n")
    with pytest.raises(DactLabError, match="is the input file"):
        predict_file(predictor, same, same)
    assert same.read_text() == "text\nhello\n"


def test_multitask_gets_a_column_pair_per_task(tmp_path):
    home, run = tiny_run("multitask")
    predictor = load_predictor(run=run, home=home)
    inp = write(tmp_path / "in.csv", csv_text(TEXTS[:3], header=("sentence",)))
    out = tmp_path / "p.csv"
    predict_file(predictor, inp, out)
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["text", "class_label_predicted", "class_label_probability", "sentiment_label_predicted",
                             "sentiment_label_probability"] == csv_columns(predictor)
    assert all(r["class_label_predicted"] in predictor.labels["class_label"] and
               r["sentiment_label_predicted"] in predictor.labels["sentiment_label"] for r in rows)
    outj = tmp_path / "p.jsonl"
    predict_file(predictor, inp, outj)
    first = json.loads(outj.read_text().splitlines()[0])
    assert set(first["tasks"]) == {"class_label", "sentiment_label"}


def test_an_upload_gives_rows_and_a_spreadsheet_safe_csv(dact):
    _, _, predictor = dact
    got = predict_upload(predictor, "mine.txt", b"=cmd|' /C calc'!A0\nsunny rain\n")
    assert got["count"] == 2 and [r["text"] for r in got["rows"]] == ["=cmd|' /C calc'!A0", "sunny rain"]
    lines = got["csv"].decode().splitlines()
    assert lines[0] == "text,predicted_label,probability,exit_layer" and lines[1].startswith("'=cmd")  # no formula runs
    assert rows_csv_bytes([], ["text"]) == b"text\n"
    with pytest.raises(DactLabError, match="mine.csv has no text column"):
        predict_upload(predictor, "mine.csv", b"a,b\n1,2\n")


# --------------------------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_a_file_from_the_cli(dact, tmp_path, capsys):
    home, run, _ = dact
    inp = write(tmp_path / "in.csv", csv_text(TEXTS))
    out = tmp_path / "preds.csv"
    code, stdout, err = run_cli(capsys, "predict", "--run", run, "--home", home, "--device", "cpu", "--input", inp,
                                "--output", out)
    assert code == 0, err
    assert f"{len(TEXTS)} rows in " in stdout and "rows/s" in stdout and str(out) in stdout
    assert "predict: 100%" in err  # the progress bar, on stderr
    with out.open(newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(TEXTS)

    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": ""}\n')
    code, _, err = run_cli(capsys, "predict", "--run", run, "--home", home, "--input", bad, "--output",
                           tmp_path / "never.csv")
    assert code == 3 and "line 2" in err and not (tmp_path / "never.csv").exists()
    for argv, msg in (
        (["--input", inp], "--input needs --output"),
        (["--output", out, "hello"], "give --input too"),
        (["--input", inp, "--output", out, "hello"], "not both"),
        (["--input", inp, "--output", out, "--json"], "drop --json"),
        ([], "Nothing to predict"),
        (["--input", inp, "--output", tmp_path / "p.parquet"], "name the output file .csv or .jsonl"),
    ):
        code, _, err = run_cli(capsys, "predict", "--run", run, "--home", home, *argv)
        assert code == 3 and msg in err, (argv, err)
