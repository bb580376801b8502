"""encoders.py: the bundled checkpoint (extraction, sha256, marker), loading by name/path, tiny encoder, LayerAdapter."""
from __future__ import annotations

import hashlib
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from dact_lib import encoders as E
from dact_lib import home as home_mod
from dact_lib.errors import EncoderError


# ------------------------------------------------------------------------------------------------ fixtures / helpers
@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The extracted bundled checkpoint in the session's encoder cache ($DACT_LAB_CACHE, set by conftest):
    90 MB, extracted once per cache, not per test."""
    return E.bundled_model_dir()


@pytest.fixture(scope="session")
def minilm(bundled_dir):
    return E.load_encoder("all-MiniLM-L6-v2")


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Path:
    """A home with its own, empty cache (no shared $DACT_LAB_CACHE)."""
    monkeypatch.delenv("DACT_LAB_CACHE", raising=False)
    h = tmp_path / "iso_home"
    h.mkdir()
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    return h


def _batch(vocab: int, pad_id: int, lengths=(7, 4, 2, 7), seed: int = 0):
    """input_ids / attention_mask with right padding; ids avoid the pad id."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    ids[ids == pad_id] = 3
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        ids[r, n:] = pad_id
    return ids, mask


def _tiny_model(family: str, attn: str | None = None):
    from transformers import AutoModel, BertConfig, DebertaConfig, DebertaV2Config, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    if family == "bert":
        cfg = BertConfig(**common)
    elif family == "roberta":
        cfg = RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    elif family == "distilbert":
        cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    elif family == "deberta-v2":  # v3-style: buckets, layer-normed rel. embeddings, shared keys, conv after layer 0
        cfg = DebertaV2Config(**common, relative_attention=True, position_buckets=16, max_relative_positions=-1,
                              pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                              position_biased_input=False, type_vocab_size=0, conv_kernel_size=3)
    elif family == "deberta":
        cfg = DebertaConfig(**common, relative_attention=True, pos_att_type=["c2p", "p2c"], type_vocab_size=0)
    else:
        raise ValueError(family)
    kwargs = {"attn_implementation": attn} if attn else {}
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, **kwargs)
    return model.eval()


def _pad_id(model) -> int:
    return getattr(model.config, "pad_token_id", 0) or 0


def _fake_zip(path: Path, weights: bytes = b"not really weights") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("tokenizer.json", "{}")
        zf.writestr("tokenizer_config.json", "{}")
        zf.writestr(E.WEIGHTS_FILE, weights)
    return path


# ------------------------------------------------------------------------------------------------ bundled checkpoint
def test_bundled_zip_found_without_import():
    import sys

    path = E.bundled_zip_path()
    assert path.name == "model.zip" and path.is_file()
    assert E.BUNDLED_PACKAGE not in sys.modules  # located, never imported (importing it prints)


def test_bundled_dir_extracted_and_verified(bundled_dir):
    d = E.bundled_model_dir()
    assert d == bundled_dir == home_mod.cache_dir() / "encoders" / "all-MiniLM-L6-v2"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        assert (d / f).is_file(), f
    sha, size = (d / E.MARKER_FILE).read_text().split()
    assert sha == E.BUNDLED_SHA256 and int(size) == (d / "model.safetensors").stat().st_size
    assert not list(d.parent.glob(".tmp-*"))  # the temp extraction dir is gone


def test_bundled_second_call_reads_only_the_marker(bundled_dir, monkeypatch):
    """Once extracted and verified, a call neither hashes the 90 MB weights nor opens the zip: it reads the marker
    (how long that takes is measured by bench/tracker_encoder_timing.py, not here)."""
    d = bundled_dir
    before = {f: (d / f).stat().st_mtime_ns for f in ("model.safetensors", E.MARKER_FILE)}

    def forbidden(what):
        def fail(*a, **k):
            raise AssertionError(f"a call on a verified folder must not {what}")
        return fail

    with monkeypatch.context() as mp:
        mp.setattr(E, "sha256_file", forbidden("hash the weights"))
        mp.setattr(E, "_verify_dir", forbidden("re-verify the folder"))
        mp.setattr(E, "_extract_verified", forbidden("extract the zip"))
        mp.setattr(E.zipfile, "ZipFile", forbidden("open the zip"))
        for _ in range(5):
            assert E.bundled_model_dir() == d
    assert before == {f: (d / f).stat().st_mtime_ns for f in before}
    assert E.resolve_encoder("bundled") == str(d)
    assert E.resolve_encoder("sentence-transformers/all-MiniLM-L6-v2") == str(d)
    assert E.encoder_fingerprint("all-MiniLM-L6-v2") == f"all-MiniLM-L6-v2@{E.BUNDLED_SHA256[:16]}"


def _copy_small_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in (E.WEIGHTS_FILE, E.MARKER_FILE):
            shutil.copy2(f, dst / f.name)


def test_corrupt_extracted_weights_raise(bundled_dir, isolated_home):
    """An extracted folder whose weights do not hash right (marker missing) -> EncoderError with the fix."""
    target = isolated_home / ".dact_cache" / "encoders" / "all-MiniLM-L6-v2"
    _copy_small_files(bundled_dir, target)
    (target / E.WEIGHTS_FILE).write_bytes(b"corrupted bytes")
    with pytest.raises(EncoderError, match="corrupt") as info:
        E.bundled_model_dir()
    msg = str(info.value)
    assert str(target) in msg and "delete" in msg and "force-reinstall" in msg
    assert not (target / E.MARKER_FILE).exists()


def test_stale_marker_with_other_size_is_rechecked(bundled_dir, isolated_home):
    target = isolated_home / ".dact_cache" / "encoders" / "all-MiniLM-L6-v2"
    _copy_small_files(bundled_dir, target)
    (target / E.WEIGHTS_FILE).write_bytes(b"truncated")
    (target / E.MARKER_FILE).write_text(f"{E.BUNDLED_SHA256}\n90868376\n")  # claims the real size
    with pytest.raises(EncoderError, match="corrupt"):
        E.bundled_model_dir()


def test_extract_verified_rejects_a_bad_zip_atomically(tmp_path):
    zp = _fake_zip(tmp_path / "model.zip")
    target = tmp_path / "enc" / "m"
    with pytest.raises(EncoderError, match="corrupt.*reinstall"):
        E._extract_verified(zp, target, "0" * 64)
    assert not target.exists() and not list((tmp_path / "enc").glob(".tmp-*"))


def test_extract_verified_concurrent_callers(tmp_path):
    zp = _fake_zip(tmp_path / "model.zip")
    with zipfile.ZipFile(zp) as zf:
        sha = hashlib.sha256(zf.read(E.WEIGHTS_FILE)).hexdigest()
    target = tmp_path / "enc" / "m"
    results, errors = [], []

    def work():
        try:
            results.append(E._extract_verified(zp, target, sha))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target] * 4
    assert E._marker_ok(target, sha)
    assert not list(target.parent.glob(".tmp-*"))


def test_bundled_model_loads(minilm):
    model, tok = minilm
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert getattr(model, "pooler", None) is None and not model.training
    assert tok("Hello World").input_ids == tok("hello world").input_ids
    ad = E.layer_adapter(model)
    assert (ad.family, ad.num_layers, ad.hidden_size) == ("bert", 6, 384)
    assert ad.word_embeddings().weight.shape == (len(tok), 384)


def test_bundled_adapter_equivalence_with_padding(minilm):
    model, tok = minilm
    b = tok(["A rather long sentence about early exit in transformers.", "Short one."], padding=True,
            return_tensors="pt")
    assert (b.attention_mask == 0).any()
    ad = E.layer_adapter(model)
    with torch.no_grad():
        ref = model(b.input_ids, b.attention_mask).last_hidden_state
        out = ad.encode(b.input_ids, b.attention_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_tokenizer_only_for_tiny(isolated_home):
    """'tiny' needs only the small tokenizer files, not the 90 MB extraction."""
    model, tok = E.tiny_encoder()
    root = isolated_home / ".dact_cache" / "encoders"
    assert (root / "all-MiniLM-L6-v2-tokenizer" / "tokenizer.json").is_file()
    assert not (root / "all-MiniLM-L6-v2").exists()
    assert len(tok) == model.config.vocab_size == 30522
    assert tok("Hello").input_ids == tok("hello").input_ids


# ------------------------------------------------------------------------------------------------ LayerAdapter
FAMILIES = [("bert", None), ("bert", "eager"), ("roberta", None), ("distilbert", None), ("distilbert", "eager"),
            ("deberta-v2", None), ("deberta", None)]


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_adapter_equivalence_with_padding(family, attn):
    model = _tiny_model(family, attn)
    ad = E.layer_adapter(model)
    assert ad.family == family and ad.num_layers == 2 and ad.hidden_size == 32
    assert len(ad.layers()) == 2 and isinstance(ad.embedding_module(), torch.nn.Module)
    assert ad.word_embeddings().weight.shape[0] == 100
    ids, mask = _batch(100, _pad_id(model))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        h = ad.embed(ids, mask)
        m = ad.prepare_mask(mask, h.dtype)
        for i in range(ad.num_layers):
            h = ad.run_layer(i, h, m)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_adapter_sub_batches(family, attn):
    """Dropping rows after a layer (early exit) gives the same rows as running the full batch."""
    model = _tiny_model(family, attn)
    ad = E.layer_adapter(model)
    ids, mask = _batch(100, _pad_id(model), lengths=(7, 3, 5, 2, 7))
    keep = torch.tensor([False, True, True, False, False])  # the kept rows are all shorter than T: padding everywhere
    with torch.no_grad():
        full = [ad.embed(ids, mask)]
        m = ad.prepare_mask(mask, full[0].dtype)
        for i in range(ad.num_layers):
            full.append(ad.run_layer(i, full[-1], m))
        h = ad.embed(ids, mask)
        h = ad.run_layer(0, h, ad.prepare_mask(mask, h.dtype))
        h = h[keep]
        h = ad.run_layer(1, h, ad.prepare_mask(mask[keep], h.dtype))
        # and a sub-batch from the start
        h0 = ad.embed(ids[keep], mask[keep])
        m0 = ad.prepare_mask(mask[keep], h0.dtype)
        for i in range(ad.num_layers):
            h0 = ad.run_layer(i, h0, m0)
    torch.testing.assert_close(h, full[-1][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(h0, full[-1][keep], atol=1e-5, rtol=0)


def test_adapter_no_padding_and_task_model_wrapper():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    clf = BertForSequenceClassification(cfg).eval()
    ad = E.layer_adapter(clf)  # uses clf.bert
    assert ad.family == "bert" and ad.model is clf.bert
    ids, mask = _batch(100, 0, lengths=(6, 6))
    with torch.no_grad():
        torch.testing.assert_close(ad.encode(ids, mask), clf.bert(ids, mask).last_hidden_state, atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        ad.run_layer(2, torch.zeros(1, 6, 32), ad.prepare_mask(mask[:1], torch.float32))


def test_adapter_unknown_family():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(EncoderError) as info:
        E.layer_adapter(model)
    msg = str(info.value)
    assert "GPT2Model" in msg
    for fam in E.SUPPORTED_FAMILIES:
        assert fam in msg


# ------------------------------------------------------------------------------------------------ names and paths
def test_tiny_encoder_deterministic_per_seed(home):
    a, _ = E.tiny_encoder(seed=1)
    b, _ = E.tiny_encoder(seed=1)
    c, _ = E.tiny_encoder(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    state = torch.random.get_rng_state()
    E.tiny_encoder(seed=3, num_layers=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    m, tok = E.load_encoder("tiny", seed=1)
    assert all(torch.equal(m.state_dict()[k], sa[k]) for k in sa)
    assert E.layer_adapter(m).num_layers == 2 and E.encoder_fingerprint("tiny") == "tiny"


def test_local_directory(home, tmp_path):
    model, tok = E.tiny_encoder(seed=5)
    folder = tmp_path / "my-encoder"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert E.resolve_encoder(str(folder)) == str(folder.resolve())
    loaded, tok2 = E.load_encoder(str(folder))
    assert tok2("Hello there").input_ids == tok("Hello there").input_ids
    ids, mask = _batch(1000, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)
    rebuilt = E.encoder_from_config(folder)  # same layout (no pooler), for load_state_dict of saved runs
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    fp = E.encoder_fingerprint(str(folder))
    assert fp.startswith("my-encoder@") and fp == E.encoder_fingerprint(str(folder))
    with pytest.raises(EncoderError, match="does not exist"):
        E.load_encoder(str(tmp_path / "nope" / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="config.json"):
        E.load_encoder(str(tmp_path / "empty"))


def test_unknown_hub_name_offline(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    name = "dact-lab-test/no-such-encoder-xyz"
    assert E.resolve_encoder(name) == name and E.encoder_fingerprint(name) == name
    with pytest.raises(EncoderError) as info:
        E.load_encoder(name)
    msg = str(info.value)
    assert name in msg and "local directory" in msg and "Hugging Face cache" in msg and "all-MiniLM-L6-v2" in msg
    with pytest.raises(EncoderError, match="no-such-encoder-xyz"):
        E.load_tokenizer(name)
    with pytest.raises(EncoderError, match="empty"):
        E.load_encoder("  ")
