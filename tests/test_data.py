"""Tests of dact_lib.data: reading and validating CSVs, label maps, splits, tokenisation and batching."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dact_lib.data import (DEMO_CSV, DatasetSplit, EncodedDataset, TextDataset, encode, iter_batches,
                           load_demo_dataset, num_batches, read_csv, split_dataset)
from dact_lib.errors import DataError

WORDS = ("the a an is was and but not very really good great fine bad awful movie film plot actor team game "
         "phone food tasty slow fast cold hot it this that i loved hated").split()


def csv_b(text: str) -> bytes:
    return text.encode("utf-8")


def balanced_csv(n_per_class: int = 10, classes: tuple[str, ...] = ("neg", "pos")) -> bytes:
    rows = ["text,label"]
    for i in range(n_per_class):
        for c in classes:
            rows.append(f"sentence number {i} about {c},{c}")
    return csv_b("\n".join(rows) + "\n")


def raises(source, *words: str, **kwargs) -> str:
    """read_csv must raise DataError whose message contains every word (case-insensitive)."""
    with pytest.raises(DataError) as info:
        read_csv(source, **kwargs)
    msg = str(info.value)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast.from_pretrained(str(d))


@pytest.fixture(scope="module")
def demo() -> TextDataset:
    return load_demo_dataset()


# -- reading ------------------------------------------------------------------------------------------------------
def test_round_trip_single_task():
    raw = csv_b('text,label\n"hello, world",pos\nbad film,neg\n"she said ""no""",neg\n"two\nlines",pos\n')
    ds = read_csv(raw)
    assert ds.tasks == ["label"] and not ds.is_multitask
    assert ds.texts == ["hello, world", "bad film", 'she said "no"', "two\nlines"]
    assert ds.label_maps == {"label": ["neg", "pos"]}
    assert ds.targets["label"].tolist() == [1, 0, 0, 1] and ds.targets["label"].dtype == np.int64
    back = read_csv(ds.to_csv_bytes())
    assert back == ds
    assert list(ds.to_frame().columns) == ["text", "label"]


def test_round_trip_two_tasks(demo):
    back = read_csv(demo.to_csv_bytes())
    assert back == demo and back.tasks == ["class_label", "sentiment_label"]
    assert list(demo.to_frame().columns) == ["sentence", "class_label", "sentiment_label"]


def test_sources_path_bytes_and_file_objects(tmp_path):
    raw = balanced_csv(3)
    path = tmp_path / "reviews.csv"
    path.write_bytes(raw)
    by_path = read_csv(path)
    assert by_path.name == "reviews" and read_csv(str(path)) == by_path
    upload = io.BytesIO(raw)
    upload.name = "upload.csv"
    upload.read(5)  # a file object already read from (Streamlit reruns) is read from the start
    from_file = read_csv(upload)
    assert from_file == by_path and from_file.name == "upload"
    assert read_csv(io.StringIO(raw.decode())) == by_path
    assert by_path.content_hash == read_csv(raw).content_hash == __import__("hashlib").sha256(raw).hexdigest()
    assert read_csv(raw, name="mine").name == "mine"


def test_aliases_sentence_category():
    ds = read_csv(csv_b("sentence,category\nfirst one,a\nsecond one,b\n"))
    assert ds.tasks == ["label"] and ds.columns == {"text": "sentence", "label": "category"}
    assert ds.texts == ["first one", "second one"]


def test_aliases_question_label_case_and_spaces():
    ds = read_csv(csv_b(" Question ,LABEL\nwhat is this?,DESC\nwho is she?,HUM\n"))
    assert ds.columns == {"text": "Question", "label": "LABEL"}
    assert ds.label_maps["label"] == ["DESC", "HUM"]


def test_explicit_mapping():
    raw = csv_b("id,review,stars\n1,great,5\n2,awful,1\n3,fine,3\n")
    ds = read_csv(raw, columns={"text": "review", "label": "stars"})
    assert ds.texts == ["great", "awful", "fine"] and ds.label_maps["label"] == ["1", "3", "5"]
    assert ds.columns == {"text": "review", "label": "stars"}
    # a two-task file read as one task through the mapping; "sentence" and "text" are interchangeable
    two = csv_b("sentence,class_label,sentiment_label\nx y,a,pos\nz w,b,neg\n")
    one = read_csv(two, columns={"sentence": "sentence", "label": "sentiment_label"})
    assert one.tasks == ["label"] and one.label_maps["label"] == ["neg", "pos"]


def test_semicolon_delimiter_with_commas_in_text():
    ds = read_csv(csv_b("text;label\nwell, it was fine, I guess;pos\nno, never, again;neg\n"))
    assert ds.texts == ["well, it was fine, I guess", "no, never, again"]
    assert ds.label_maps["label"] == ["neg", "pos"]


def test_tab_delimiter():
    ds = read_csv(csv_b("text\tlabel\nhello there, friend\tpos\nbye; now\tneg\n"))
    assert ds.texts == ["hello there, friend", "bye; now"]


def test_quoted_newline_and_crlf():
    ds = read_csv(csv_b('text,label\r\n"line one\r\nline two",pos\r\nsimple,neg\r\n'))
    assert ds.texts == ["line one\nline two", "simple"]


def test_utf8_bom():
    ds = read_csv("text,label\ncafé crème,pos\nbad,neg\n".encode("utf-8-sig"))
    assert ds.columns["text"] == "text" and ds.texts[0] == "café crème" and ds.warnings == []


def test_utf16_with_bom_and_trailing_delimiters():
    ds = read_csv("text\tlabel\t\t\nnaïve\tpos\t\t\nbad\tneg\t\t\n".encode("utf-16"))
    assert ds.texts == ["naïve", "bad"] and ds.columns == {"text": "text", "label": "label"}


def test_latin1_warning_and_text():
    ds = read_csv("text,label\ncafé très bon,pos\nmauvais goût,neg\n".encode("latin-1"))
    assert ds.texts == ["café très bon", "mauvais goût"]
    assert any("latin-1" in w.lower() and "utf-8" in w.lower() for w in ds.warnings)


def test_blank_lines_are_skipped_and_row_numbers_still_count_them():
    raw = csv_b("text,label\nfirst,a\n\nsecond,b\n,a\n\n")
    raises(raw, "row 5")


def test_label_map_numeric_sort():
    ds = read_csv(csv_b("text,label\na,10\nb,2\nc,1\nd,2\ne,10\n"))
    assert ds.label_maps["label"] == ["1", "2", "10"]
    assert ds.targets["label"].tolist() == [2, 1, 0, 1, 2]
    assert ds.num_classes() == 3 and ds.class_counts() == {"1": 1, "2": 2, "10": 2}


def test_labels_stripped_texts_stripped():
    ds = read_csv(csv_b("text,label\n  padded text  , pos \nother,neg\n"))
    assert ds.texts[0] == "padded text" and ds.label_maps["label"] == ["neg", "pos"]


def test_given_label_maps():
    maps = {"label": ["neg", "neutral", "pos"]}
    ds = read_csv(csv_b("text,label\na,pos\nb,pos\n"), label_maps=maps)  # one class present is fine here
    assert ds.label_maps == maps and ds.targets["label"].tolist() == [2, 2]
    assert ds.class_counts() == {"neg": 0, "neutral": 0, "pos": 2}
    raises(csv_b("text,label\na,pos\nb,angry\n"), "'angry'", "known classes", label_maps=maps)


def test_numeric_text_below_share_is_a_warning():
    rows = ["text,label"] + [f"words {i},{'ab'[i % 2]}" for i in range(200)] + ["645,a"]
    ds = read_csv(csv_b("\n".join(rows)))
    assert len(ds) == 201 and any("row 202" in w for w in ds.warnings)
    assert len(read_csv(csv_b("text,label\n10/10,a\nmeh,b\n"))) == 2  # a rating is text


# -- one test per kind of bad input ----------------------------------------------------------------------------
def test_error_binary_file():
    raises(b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)), "binary", "xlsx", "export", "csv")
    raises(b"text,label\x00\x00\x01", "binary", "export")


def test_error_not_a_csv_single_column():
    raises(csv_b("just some text\nmore text here\n"), "no delimiter", "header")


def test_error_parse_error():
    raises(csv_b("text,label\nok,pos\nhello, world,pos\n"), "could not be read as csv", "quote")


def test_error_missing_columns():
    msg = raises(csv_b("review,stars\ngood,5\nbad,1\n"), "no text column", "'review'", "'stars'", "sentence",
                 "columns=")
    assert "question" in msg
    raises(csv_b("text,stars\ngood,5\nbad,1\n"), "no label column", "category", "columns=")
    raises(csv_b("sentence,class_label\ngood,a\nbad,b\n"), "'mood'", "not in the file", "'class_label'",
           "mapping", columns={"sentiment_label": "mood"})


def test_error_ambiguous_columns():
    raw = csv_b("text,sentence,label\na,b,x\nc,d,y\n")
    raises(raw, "ambiguous", "'text'", "'sentence'", "columns=")
    assert read_csv(raw, columns={"text": "sentence"}).texts == ["b", "d"]


def test_error_duplicate_headers():
    raises(csv_b("text,label,Text\na,x,b\nc,y,d\n"), "duplicate", "'text'", "columns 1, 3", "rename")


def test_error_bad_mapping_key():
    raises(csv_b("text,label\na,x\nb,y\n"), "unknown column-mapping key", "'review'", "text", "label",
           columns={"review": "text"})


def test_error_empty_file():
    raises(b"", "empty", "header")
    raises(b"\n\n  \n", "empty")
    raises(csv_b("text,label\n"), "no data rows", "add")


def test_error_empty_text_cells_row_numbers():
    raw = csv_b('text,label\nfine,a\n   ,b\n"multi\nline",a\n,b\nok,a\n')
    raises(raw, "empty cells", "rows 3, 5", "header as row 1", "fill in")


def test_error_numeric_text_cells():
    raises(csv_b("text,label\n1234,a\nhello,b\n56.5,a\n"), "numbers instead of text", "rows 2, 4",
           "right column")


def test_error_row_list_is_capped_at_ten():
    rows = ["text,label"] + [f",{'ab'[i % 2]}" for i in range(15)]
    msg = raises(csv_b("\n".join(rows)), "and 5 more")
    assert "rows 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and" in msg


def test_error_empty_label_cells():
    raises(csv_b("text,label\na,x\nb,\nc,y\nd\n"), "label column 'label'", "rows 3, 5", "give every row")


def test_error_fewer_than_two_classes():
    raises(csv_b("text,label\na,pos\nb,pos\n"), "only 1 class", "pos", "at least 2", "add rows")


def test_error_file_too_big(tmp_path):
    raw = balanced_csv(50)
    raises(raw, f"{len(raw):,} bytes", "1,000 bytes", "sample", "max_bytes", max_bytes=1000)
    path = tmp_path / "big.csv"
    path.write_bytes(raw)
    raises(path, "over the limit", max_bytes=1000)
    raises(io.BytesIO(raw), "over the limit", max_bytes=1000)
    assert len(read_csv(raw, max_bytes=len(raw))) == 100


def test_error_missing_path(tmp_path):
    raises(tmp_path / "nope.csv", "does not exist", "path")


# -- sampling and splitting ----------------------------------------------------------------------------------
def test_max_rows_sample_is_stratified_deterministic_and_in_file_order():
    raw = balanced_csv(60, ("a", "b", "c"))  # 180 rows
    full = read_csv(raw)
    s1 = read_csv(raw, max_rows=30, seed=1)
    s2 = read_csv(raw, max_rows=30, seed=1)
    s3 = read_csv(raw, max_rows=30, seed=2)
    assert s1 == s2 and s1 != s3 and len(s1) == 30
    assert s1.class_counts() == {"a": 10, "b": 10, "c": 10}
    positions = [full.texts.index(t) for t in s1.texts]
    assert positions == sorted(positions)
    assert s1.content_hash == full.content_hash and "30" in s1.name and s1.label_maps == full.label_maps
    assert read_csv(raw, max_rows=500) == full


def test_split_stratified_deterministic_disjoint_covering(demo):
    sp = split_dataset(demo, val_frac=0.1, test_frac=0.2, seed=3)
    assert isinstance(sp, DatasetSplit) and sp.test is not None
    parts = [sp.train.texts, sp.val.texts, sp.test.texts]
    assert sum(map(len, parts)) == len(demo)
    assert set().union(*map(set, parts)) == set(demo.texts)
    assert not (set(parts[0]) & set(parts[1]) or set(parts[0]) & set(parts[2]) or set(parts[1]) & set(parts[2]))
    assert len(sp.test) == 81 and len(sp.val) == 41
    for part in (sp.val, sp.test):  # stratified: each class's share within one row of the whole
        for task in demo.tasks:
            for cls, k in part.class_counts(task).items():
                assert abs(k - len(part) / 3) <= 1.5
    again = split_dataset(demo, val_frac=0.1, test_frac=0.2, seed=3)
    assert again.train == sp.train and again.val == sp.val and again.test == sp.test
    assert split_dataset(demo, 0.1, 0.2, seed=4).val != sp.val
    assert sp.train.label_maps == demo.label_maps and sp.train.name == demo.name
    order = [demo.texts.index(t) for t in sp.train.texts]
    assert order == sorted(order)


def test_split_without_test():
    ds = read_csv(balanced_csv(20))
    sp = split_dataset(ds, val_frac=0.25, test_frac=0.0, seed=0)
    assert sp.test is None and len(sp.val) == 10 and sp.val.class_counts() == {"neg": 5, "pos": 5}


def test_split_error_class_too_small():
    rows = ["text,label"] + [f"t{i},big" for i in range(30)] + ["x1,tiny", "x2,tiny"]
    ds = read_csv(csv_b("\n".join(rows)))
    with pytest.raises(DataError) as info:
        split_dataset(ds, val_frac=0.1, test_frac=0.1)
    msg = str(info.value)
    for w in ("'tiny'", "only 2 rows", "at least 3", "Add more rows", "test_frac=0"):
        assert w in msg, msg
    assert split_dataset(ds, val_frac=0.2, test_frac=0.0).test is None


def test_split_error_held_out_part_smaller_than_class_count():
    ds = read_csv(balanced_csv(4, ("a", "b", "c", "d", "e")))  # 20 rows, 5 classes
    with pytest.raises(DataError, match="at least one row of each"):
        split_dataset(ds, val_frac=0.1, test_frac=0.1)


# -- tokenisation and batching --------------------------------------------------------------------------------
def _encoded(tokenizer, n: int = 40, seed: int = 0, max_len: int = 64) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]
    ds = TextDataset(texts=texts, targets={"label": np.arange(n) % 2}, label_maps={"label": ["a", "b"]})
    return encode(ds, tokenizer, max_seq_len=max_len)


def test_encode_truncates_and_keeps_targets(tokenizer):
    ds = read_csv(csv_b("text,label\nthe movie was really very good and i loved it,pos\nbad,neg\n"))
    enc = encode(ds, tokenizer, max_seq_len=8)
    assert len(enc) == 2 and enc.lengths.tolist() == [8, 3]
    assert enc.input_ids[0][0] == tokenizer.cls_token_id and enc.input_ids[0][-1] == tokenizer.sep_token_id
    assert enc.input_ids[1] == [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("bad"),
                                tokenizer.sep_token_id]
    assert enc.targets["label"].dtype == torch.long and enc.targets["label"].tolist() == [1, 0]
    assert enc.pad_token_id == tokenizer.pad_token_id
    sub = enc.subset([1])
    assert sub.input_ids == [enc.input_ids[1]] and sub.targets["label"].tolist() == [0]


def test_iter_batches_pads_to_batch_longest(tokenizer):
    enc = _encoded(tokenizer, n=10)
    batches = list(iter_batches(enc, 4))
    assert [len(b["index"]) for b in batches] == [4, 4, 2] and num_batches(enc, 4) == 3
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))  # file order
    for b in batches:
        idx = b["index"].numpy()
        assert b["input_ids"].shape[1] == enc.lengths[idx].max() < 64
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        assert b["attention_mask"].sum(1).tolist() == enc.lengths[idx].tolist()
        for row, i in enumerate(idx):
            n = enc.lengths[i]
            assert b["input_ids"][row, :n].tolist() == enc.input_ids[i]
            assert (b["input_ids"][row, n:] == enc.pad_token_id).all()
        assert b["targets"]["label"].tolist() == enc.targets["label"][b["index"]].tolist()


def test_iter_batches_pad_to(tokenizer):
    enc = _encoded(tokenizer, n=6, max_len=20)
    widths = {b["input_ids"].shape[1] for b in iter_batches(enc, 3, pad_to=24)}
    assert widths == {24}
    assert {b["input_ids"].shape[1] for b in iter_batches(enc, 6, pad_to=8)} == {int(enc.lengths.max())}


def test_iter_batches_shuffle_deterministic_per_seed_and_epoch(tokenizer):
    enc = _encoded(tokenizer, n=30)

    def order(**kw):
        return torch.cat([b["index"] for b in iter_batches(enc, 4, shuffle=True, **kw)]).tolist()

    a = order(seed=1, epoch=0)
    assert sorted(a) == list(range(30)) and a != list(range(30))
    assert order(seed=1, epoch=0) == a
    assert order(seed=1, epoch=1) != a and order(seed=2, epoch=0) != a


def test_iter_batches_group_by_length(tokenizer):
    enc = _encoded(tokenizer, n=200, seed=5)
    kw = dict(shuffle=True, seed=0, epoch=0)
    grouped = list(iter_batches(enc, 8, group_by_length=True, chunk_batches=5, **kw))
    plain = list(iter_batches(enc, 8, **kw))
    idx = torch.cat([b["index"] for b in grouped]).tolist()
    assert sorted(idx) == list(range(200)) and len(grouped) == num_batches(enc, 8) == 25

    def spread(batches):
        return np.mean([np.ptp(enc.lengths[b["index"].numpy()]) for b in batches])

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert spread(grouped) < spread(plain) / 2 and padding(grouped) < padding(plain)
    again = list(iter_batches(enc, 8, group_by_length=True, chunk_batches=5, **kw))
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in grouped]
    unshuffled = list(iter_batches(enc, 8, group_by_length=True, chunk_batches=5))  # evaluation: no rng
    assert sorted(torch.cat([b["index"] for b in unshuffled]).tolist()) == list(range(200))
    assert spread(unshuffled) < spread(plain) / 2
    other = list(iter_batches(enc, 8, group_by_length=True, chunk_batches=5, shuffle=True, seed=0, epoch=1))
    assert [b["index"].tolist() for b in other] != [b["index"].tolist() for b in grouped]


# -- the demo dataset and the shared real data ---------------------------------------------------------------
def test_demo_dataset(demo):
    assert DEMO_CSV.is_file() and demo.name == "demo" and len(demo) >= 360
    assert demo.is_multitask and demo.tasks == ["class_label", "sentiment_label"]
    assert demo.label_maps == {"class_label": ["food", "sports", "technology"],
                               "sentiment_label": ["negative", "neutral", "positive"]}
    pairs = Counter(zip(demo.targets["class_label"].tolist(), demo.targets["sentiment_label"].tolist()))
    assert len(pairs) == 9 and all(40 <= k <= 50 for k in pairs.values())
    assert len(set(demo.texts)) == len(demo)
    assert all(5 <= len(t.split()) <= 20 for t in demo.texts)
    assert demo.warnings == []


def test_shared_real_datasets(shared_data: Path):
    sst2 = read_csv(shared_data / "sst2" / "train.csv")
    assert len(sst2) == 6920 and sst2.class_counts() == {"negative": 3310, "positive": 3610}
    reviews = read_csv(shared_data / "reviews_multitask" / "reviews.csv")
    assert reviews.tasks == ["class_label", "sentiment_label"] and len(reviews) == 3000
    assert reviews.class_counts("class_label") == {"amazon": 1000, "imdb": 1000, "yelp": 1000}
    assert reviews.class_counts("sentiment_label") == {"negative": 1500, "positive": 1500}
    sp = split_dataset(reviews, 0.1, 0.1, seed=0)
    assert len(sp.test) == 300 and len(sp.val) == 300


def test_csv_header_offers_the_column_names_and_never_raises():
    from dact_lib.data import csv_header

    assert csv_header(b"review;stars\nok;1\n") == ["review", "stars"]
    assert csv_header("\ufefftext,label\r\nfine,a\r\n".encode()) == ["text", "label"]  # BOM and CRLF
    assert csv_header("t\xe9xt\tlabel\n".encode("cp1252")) == ["téxt", "label"]  # Latin-1 fallback, tab
    assert csv_header("sentence,class_label\n".encode("utf-16")) == ["sentence", "class_label"]
    assert csv_header(b"justonecolumn\nx\n") == [] and csv_header(b"") == []
    assert csv_header(b"PK\x03\x04binary") == []  # a zip / xlsx: read_csv explains, the header is just empty


def test_non_utf8_files_decode_as_windows_1252_not_latin1():
    """cp1252's smart quotes and dashes (0x93, 0x94, 0x97) are C1 control characters in Latin-1."""
    from dact_lib.data import read_csv as _read

    raw = "text,label\n“Smart” quotes — fine,pos\nplain,neg\n".encode("cp1252")
    raw += b"".join(f"row {i},{'pos' if i % 2 else 'neg'}\n".encode() for i in range(12))
    ds = _read(raw)
    assert ds.texts[0] == "“Smart” quotes — fine"
    assert not any(0x80 <= ord(c) <= 0x9F for c in ds.texts[0])
    assert any("Windows-1252" in w for w in ds.warnings)


def test_a_header_holding_two_delimiters_splits_on_the_one_the_rows_use():
    """`review, in short;label`: the header holds ',' and ';'; csv.Sniffer on the rows says ';'."""
    from dact_lib.data import read_csv as _read

    rows = ["review, in short;label"] + [f"{t};{lab}" for t, lab in [
        ("a fine film, truly", "pos"), ("dull, slow and long", "neg"), ("loved it", "pos"),
        ("hated it, sadly", "neg")] * 5]
    ds = _read("\n".join(rows).encode(), columns={"text": "review, in short"})
    assert ds.texts[:2] == ["a fine film, truly", "dull, slow and long"]
    assert ds.label_maps == {"label": ["neg", "pos"]} and len(ds) == 20
