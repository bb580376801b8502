"""Tests of dact_lib.tracker: schema, datasets, runs, metrics/events/artifacts, concurrency, Optuna sharing."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest

from dact_lib.callbacks import LoopState
from dact_lib.errors import DactLabError
from dact_lib.tracker import Tracker, TrackerCallback

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a stand-in TextDataset


class FakeDataset:
    """The attributes of data.TextDataset that the tracker uses."""

    def __init__(self, texts, labels, name="toy"):
        self.texts = list(texts)
        names = sorted(set(labels), key=str)
        self.label_maps = {"label": names}
        self.targets = {"label": np.array([names.index(x) for x in labels], dtype=np.int64)}
        self.name = name
        self.columns = ["text", "label"]
        self.content_hash = hashlib.sha256(self.to_csv_bytes()).hexdigest()

    @property
    def tasks(self):
        return list(self.targets)

    def __len__(self):
        return len(self.texts)

    def to_csv_bytes(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["text", "label"])
        names = self.label_maps["label"]
        for t, y in zip(self.texts, self.targets["label"]):
            w.writerow([t, names[int(y)]])
        return buf.getvalue().encode("utf-8")


def fake_read_csv(src, name=None):
    text = src.decode("utf-8") if isinstance(src, (bytes, bytearray)) else open(src, encoding="utf-8").read()
    rows = list(csv.DictReader(io.StringIO(text)))
    return FakeDataset([r["text"] for r in rows], [r["label"] for r in rows], name=name or "csv")


def toy(n=12, name="toy", salt=""):
    texts = [f"text number {i}{salt}" for i in range(n)]
    labels = ["pos" if i % 3 else "neg" for i in range(n)]
    return FakeDataset(texts, labels, name=name)


@pytest.fixture
def tr(home, any_db):
    """A tracker on SQLite and (a second run of every test using it) on a PostgreSQL server."""
    t = Tracker(home)
    assert t.dialect == any_db
    yield t
    t.close()


# ----------------------------------------------------------------------------- schema


def test_schema_idempotent_and_wal(home):
    t1 = Tracker(home)
    rid = t1.create_run("backbone", {"a": 1})
    t2 = Tracker(home)  # second tracker on the same file: nothing recreated, data kept
    assert t2.get_run(rid)["config"] == {"a": 1}
    assert t1.db_path == t2.db_path == home / "experiments.db"
    assert t2.journal_mode() == "wal"
    assert t2.db.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30000
    tables = set(t2.db.table_names())
    assert {"datasets", "runs", "metrics", "events", "artifacts"} <= tables


def test_schema_adds_missing_columns(home):
    import sqlite3

    conn = sqlite3.connect(home / "experiments.db")
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, status TEXT)")
    conn.execute("INSERT INTO runs (kind, status) VALUES ('backbone', 'finished')")
    conn.commit()
    conn.close()
    t = Tracker(home)
    run = t.get_run(1)
    assert run["kind"] == "backbone" and run["summary"] == {} and "run_dir" in run
    t.update_run(1, summary={"acc": 0.5})
    assert t.get_run(1)["summary"] == {"acc": 0.5}


def test_home_from_env(home):
    assert Tracker().home == home.resolve()


# ----------------------------------------------------------------------------- datasets


def test_dataset_add_dedupe_list_get_delete(tr):
    ds = toy()
    did = tr.add_dataset(ds)
    assert tr.add_dataset(toy(), name="other name") == did  # same content -> same id, nothing updated
    did2 = tr.add_dataset(toy(salt="!"), name="second")
    assert did2 != did
    listed = tr.list_datasets()
    assert [d["id"] for d in listed] == [did2, did]
    assert all("csv" not in d for d in listed)
    meta = tr.get_dataset(did)
    assert meta["name"] == "toy" and meta["rows"] == 12 and meta["content_hash"] == ds.content_hash
    assert meta["columns"] == ["text", "label"] and meta["tasks"] == ["label"]
    assert meta["label_maps"] == {"label": ["neg", "pos"]}
    assert meta["class_counts"] == {"label": {"neg": 4, "pos": 8}}
    assert tr.get_dataset_csv(did) == ds.to_csv_bytes()
    assert tr.get_dataset(did2)["name"] == "second"

    rid = tr.create_run("backbone", dataset_id=did)  # running
    with pytest.raises(DactLabError, match="active run"):
        tr.delete_dataset(did)
    tr.set_status(rid, "finished")
    tr.delete_dataset(did)
    with pytest.raises(DactLabError, match=f"dataset {did} is not"):
        tr.get_dataset(did)
    with pytest.raises(DactLabError):
        tr.delete_dataset(did)
    assert [d["id"] for d in tr.list_datasets()] == [did2]
    assert tr.add_dataset(toy()) > did2  # ids are never reused


def test_load_dataset_round_trip_with_stub(tr, monkeypatch):
    stub = types.ModuleType("dact_lib.data")
    stub.read_csv = fake_read_csv
    monkeypatch.setitem(sys.modules, "dact_lib.data", stub)
    ds = toy(name="round")
    did = tr.add_dataset(ds)
    back = tr.load_dataset(did)
    assert back.name == "round"
    assert back.texts == ds.texts
    assert back.label_maps == ds.label_maps
    np.testing.assert_array_equal(back.targets["label"], ds.targets["label"])


def test_load_dataset_round_trip_real(tr):
    from dact_lib import data

    rows = ["text,label,extra"] + [f"sample sentence number {i},{'good' if i % 2 else 'bad'},x" for i in range(40)]
    raw = "\n".join(rows).encode("utf-8") + b"\n"
    ds = data.read_csv(raw, name="real")
    did = tr.add_dataset(ds)
    assert tr.add_dataset(ds) == did
    meta = tr.get_dataset(did)
    assert meta["rows"] == 40 and meta["tasks"] == ["label"] and meta["class_counts"] == {"label": {"bad": 20, "good": 20}}
    back = tr.load_dataset(did)
    assert back.name == "real" and len(back) == len(ds) and back == ds
    assert back.content_hash == meta["content_hash"]  # the stored hash is the hash of the stored canonical CSV
    assert tr.add_dataset(back) == did  # so a dataset read back dedupes to itself
    # the same rows in another file layout (CRLF, extra column dropped) are the same stored dataset ...
    assert tr.add_dataset(data.read_csv(raw.replace(b"\n", b"\r\n"), name="crlf")) == did
    # ... while a max_rows sample (which carries its source file's content_hash) is a new one
    sample = data.read_csv(raw, name="sample", max_rows=10)
    sid = tr.add_dataset(sample)
    assert sid != did and tr.get_dataset(sid)["rows"] == 10 and len(tr.load_dataset(sid)) == 10


# ----------------------------------------------------------------------------- runs


def test_run_lifecycle(tr):
    t0 = time.time()
    rid = tr.create_run("dact", {"lr": 1e-3, "layers": [1, 2]}, name="first", tag="t1", status="queued")
    run = tr.get_run(rid)
    assert run["status"] == "queued" and run["started"] is None and run["ended"] is None
    assert run["created"] >= t0 - 1 and run["pid"] == os.getpid() and run["host"]
    assert run["config"] == {"lr": 1e-3, "layers": [1, 2]} and run["summary"] == {}
    assert run["kind"] == "dact" and run["name"] == "first" and run["tag"] == "t1"
    tr.set_status(rid, "running")
    run = tr.get_run(rid)
    assert run["status"] == "running" and run["started"] >= run["created"] and run["ended"] is None
    tr.update_run(rid, summary={"best": {"acc": 0.9}}, name="renamed")
    tr.set_status(rid, "finished")
    run = tr.get_run(rid)
    assert run["status"] == "finished" and run["ended"] >= run["started"]
    summary = dict(run["summary"])
    assert summary.pop("environment")["packages"]["python"]  # recorded when it started running (sysinfo)
    assert summary == {"best": {"acc": 0.9}} and run["name"] == "renamed" and run["error"] is None

    rid2 = tr.create_run("backbone")
    assert tr.get_run(rid2)["started"] is not None and tr.get_run(rid2)["config"] == {}
    tr.set_status(rid2, "failed", error="CUDA out of memory: reduce the batch size")
    run2 = tr.get_run(rid2)
    assert run2["status"] == "failed" and "out of memory" in run2["error"] and run2["ended"] is not None

    with pytest.raises(DactLabError, match="run 999"):
        tr.get_run(999)
    with pytest.raises(DactLabError, match="run 999"):
        tr.set_status(999, "finished")
    with pytest.raises(DactLabError, match="run 999"):
        tr.update_run(999, name="x")
    with pytest.raises(DactLabError, match="status"):
        tr.set_status(rid, "done")
    with pytest.raises(DactLabError, match="unknown run field"):
        tr.update_run(rid, colour="red")


def test_list_runs_filters_newest_first(tr):
    a = tr.create_run("backbone", tag="x")
    b = tr.create_run("tune-backbone", tag="study", status="running")
    c1 = tr.create_run("backbone", parent_id=b, tag="study")
    c2 = tr.create_run("backbone", parent_id=b, tag="study", status="queued")
    tr.set_status(a, "finished")
    assert [r["id"] for r in tr.list_runs()] == [c2, c1, b, a]
    assert [r["id"] for r in tr.list_runs(kind="backbone")] == [c2, c1, a]
    assert [r["id"] for r in tr.list_runs(kind=["backbone", "tune-backbone"], limit=2)] == [c2, c1]
    assert [r["id"] for r in tr.list_runs(status="running")] == [c1, b]
    assert [r["id"] for r in tr.list_runs(parent_id=b)] == [c2, c1]
    assert [r["id"] for r in tr.list_runs(tag="study", status="queued")] == [c2]
    assert [r["id"] for r in tr.list_runs(top_level=True)] == [b, a]
    assert tr.list_runs(kind="pbt") == []


def test_run_dir_and_delete_run(tr):
    parent = tr.create_run("pbt")
    child = tr.create_run("pbt-member", parent_id=parent)
    grandchild = tr.create_run("pbt-member", parent_id=child)
    other = tr.create_run("backbone")
    for r in (parent, child, grandchild, other):
        d = tr.run_dir(r)
        assert d == tr.home / "runs" / str(r) and d.is_dir()
        assert tr.get_run(r)["run_dir"] == str(d)
        (d / "weights.bin").write_bytes(b"x")
        tr.log_metrics(r, {"loss": 1.0}, step=1)
        tr.log_event(r, "note", {"r": r})
        tr.add_artifact(r, d / "weights.bin", "weights")
    with pytest.raises(DactLabError, match="still queued/running"):
        tr.delete_run(parent)
    for r in (parent, child, grandchild):
        tr.set_status(r, "finished")
    tr.delete_run(parent)
    for r in (parent, child, grandchild):
        with pytest.raises(DactLabError):
            tr.get_run(r)
        assert not (tr.home / "runs" / str(r)).exists()
        assert tr.get_metrics(r).empty and tr.get_events(r) == [] and tr.get_artifacts(r) == []
    assert tr.get_run(other)["status"] == "running" and len(tr.get_metrics(other)) == 1
    tr.delete_run(other, force=True)
    assert tr.list_runs() == []


def test_mark_interrupted(tr, monkeypatch):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout.strip())
    dead = tr.create_run("backbone")
    tr.update_run(dead, pid=dead_pid)
    dead_q = tr.create_run("backbone", status="queued")
    tr.update_run(dead_q, pid=dead_pid)
    alive_other = tr.create_run("backbone")
    tr.update_run(alive_other, pid=os.getppid())  # a live process that is not us
    other_host = tr.create_run("backbone")
    tr.update_run(other_host, pid=dead_pid, host="some-other-machine")
    finished = tr.create_run("backbone")
    tr.update_run(finished, pid=dead_pid)
    tr.set_status(finished, "finished")
    mine_live = tr.create_run("backbone")
    mine_lost = tr.create_run("backbone")
    from dact_lib.tracker import liveness

    liveness.restore({mine_live})  # conftest restores the registry after the test

    assert tr.mark_interrupted(grace_s=3600) == [dead, dead_q]  # the grace spares this process's fresh run
    assert sorted(tr.mark_interrupted()) == [mine_lost]
    for r in (dead, dead_q, mine_lost):
        run = tr.get_run(r)
        assert run["status"] == "interrupted" and run["ended"] is not None and "interrupted" in run["error"]
    for r in (alive_other, other_host, mine_live):
        assert tr.get_run(r)["status"] == "running"
    assert tr.get_run(finished)["status"] == "finished"
    assert tr.mark_interrupted() == []


# ----------------------------------------------------------------------------- metrics / events / artifacts


def test_metrics_log_get_latest(tr):
    a, b = tr.create_run("backbone"), tr.create_run("backbone")
    for step in range(1, 6):
        tr.log_metrics(a, {"train_loss": 1.0 / step, "lr": np.float32(0.5), "skip": "text"}, step=step, epoch=0)
    tr.log_metrics(a, {"val_acc": 0.7}, step=5, epoch=0, time=123.0)
    tr.log_metrics(a, {"val_acc": 0.8}, step=5, epoch=0)  # a later value at the same step wins in latest_metrics
    tr.log_metrics_many(
        [{"run_id": b, "step": s, "epoch": None, "name": "train_loss", "value": 2.0 / s, "time": 1.0} for s in (1, 2)]
    )
    df = tr.get_metrics(a)
    assert list(df.columns) == ["run_id", "step", "epoch", "name", "value", "time"]
    assert len(df) == 12 and set(df["name"]) == {"train_loss", "lr", "val_acc"}
    assert df["step"].is_monotonic_increasing and (df["run_id"] == a).all()
    assert df[df["name"] == "lr"]["value"].tolist() == [0.5] * 5
    assert df[(df["name"] == "val_acc")]["time"].iloc[0] == 123.0
    sub = tr.get_metrics(a, names=["train_loss"], since_step=3)
    assert sub["step"].tolist() == [4, 5] and sub["value"].tolist() == pytest.approx([0.25, 0.2])
    both = tr.get_metrics([a, b], names=["train_loss"])
    assert len(both) == 7 and set(both["run_id"]) == {a, b}
    assert both[both["run_id"] == b]["epoch"].isna().all()
    empty = tr.get_metrics(b, names=["nope"])
    assert empty.empty and list(empty.columns) == list(df.columns)
    latest = tr.latest_metrics(a)
    assert latest == {"train_loss": pytest.approx(0.2), "lr": 0.5, "val_acc": 0.8}
    assert tr.latest_metrics(999) == {}


def test_events_and_artifacts(tr, tmp_path):
    rid = tr.create_run("dact")
    tr.log_event(rid, "oom_retry", {"batch_size": 16, "nested": {"a": [1, 2]}, "arr": np.arange(3)})
    tr.log_event(rid, "early_stop", {"epoch": 3})
    tr.log_event(rid, "note")
    ev = tr.get_events(rid)
    assert [e["kind"] for e in ev] == ["oom_retry", "early_stop", "note"]
    assert ev[0]["payload"] == {"batch_size": 16, "nested": {"a": [1, 2]}, "arr": [0, 1, 2]}
    assert ev[2]["payload"] == {} and ev[0]["time"] <= ev[1]["time"]
    assert [e["payload"] for e in tr.get_events(rid, kinds=["early_stop"])] == [{"epoch": 3}]
    tr.add_artifact(rid, tmp_path / "model.safetensors", "weights")
    tr.add_artifact(rid, "config.json", "config")
    arts = tr.get_artifacts(rid)
    assert [(a["path"], a["kind"]) for a in arts] == [
        (str(tmp_path / "model.safetensors"), "weights"),
        (str(tr.home / "config.json"), "config"),  # stored relative to the home
    ]
    assert all(a["run_id"] == rid and a["created"] > 0 for a in arts)


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_thread_writers_and_reader(tr):
    n_threads, n_steps, per_step = 4, 250, 2  # 500 metric rows per thread, one transaction per step
    runs = [tr.create_run("backbone", name=f"w{i}") for i in range(n_threads)]
    errors: list[BaseException] = []
    done = threading.Event()
    reads = [0]

    def writer(rid):
        try:
            for step in range(n_steps):
                tr.log_metrics(rid, {f"m{k}": step + k / 10 for k in range(per_step)}, step=step, epoch=step // 10)
                if step % 5 == 0:
                    tr.log_event(rid, "tick", {"step": step})
            tr.log_metrics_many([{"run_id": rid, "step": n_steps, "name": f"x{k}", "value": k} for k in range(100)])
            tr.set_status(rid, "finished")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        try:
            while not done.is_set():
                tr.get_metrics(runs, since_step=0)
                tr.list_runs()
                tr.latest_metrics(runs[0])
                reads[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in runs]
    rt = threading.Thread(target=reader)
    rt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    rt.join(60)
    assert not errors, errors
    assert reads[0] > 0
    df = tr.get_metrics(runs)
    assert len(df) == n_threads * (n_steps * per_step + 100)
    for r in runs:
        assert len(df[df["run_id"] == r]) == n_steps * per_step + 100
        assert len(tr.get_events(r)) == n_steps // 5
        assert tr.get_run(r)["status"] == "finished"


_PROC_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from dact_lib.tracker import Tracker
    home, go, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    tr = Tracker(home)
    rid = tr.create_run("backbone", tag=tag)
    deadline = time.time() + 30
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.005)
    for step in range(60):
        tr.log_metrics(rid, {{"a": step, "b": -step, "c": 0.5, "d": 1.5, "e": 2.5}}, step=step)
        if step % 10 == 0:
            tr.log_event(rid, "tick", {{"step": step}})
    tr.set_status(rid, "finished")
    print(rid)
    """
)


def test_two_processes_write_at_once(tr, tmp_path):
    go = tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(_PROC_WRITER.format(root=PROJECT_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tr.home), str(go), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    mine = tr.create_run("backbone", tag="main")
    time.sleep(0.3)
    go.write_text("go")
    for step in range(60):  # this process writes too
        tr.log_metrics(mine, {"x": step}, step=step)
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    ids = [int(out.strip()) for out, _ in outs]
    for rid in ids:
        assert len(tr.get_metrics(rid)) == 300
        assert len(tr.get_events(rid)) == 6
        assert tr.get_run(rid)["status"] == "finished"
    assert len(tr.get_metrics(mine)) == 60


def test_optuna_shares_the_sqlite_file(tr):
    import optuna

    from dact_lib import home as home_mod

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = home_mod.optuna_storage_url(tr.home)
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": {"timeout": 30} if tr.dialect == "sqlite" else {}}
    )
    study = optuna.create_study(study_name="shared", storage=storage, direction="minimize")
    errors: list[BaseException] = []
    stop = threading.Event()
    runs = [tr.create_run("backbone") for _ in range(3)]

    def writer(rid):
        try:
            step = 0
            while not stop.is_set() or step < 50:
                tr.log_metrics(rid, {"loss": 1.0 / (step + 1), "acc": 0.5}, step=step)
                if step % 10 == 0:
                    tr.log_event(rid, "tick", {"step": step})
                step += 1
                time.sleep(0.001)  # a busy loop would only measure GIL contention
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def objective(trial):
        x = trial.suggest_float("x", -5, 5)
        trial.report(x * x, 0)
        return (x - 1) ** 2

    def tune():
        try:
            study.optimize(objective, n_trials=20, catch=())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    tt = threading.Thread(target=tune)
    tt.start()
    tt.join(60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(study.trials) == 20
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if tr.dialect == "sqlite":
        assert tr.journal_mode() == "wal"  # Optuna's connections did not undo WAL
        names = set(tr.db.table_names())
    else:  # the same server database: Optuna's tables next to the tracker's
        assert url.startswith("postgresql+psycopg://")
        names = {r["table_name"] for r in tr.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    assert {"studies", "trials", "runs", "metrics"} <= names
    for r in runs:
        assert len(tr.get_metrics(r)) >= 100
    storage.engine.dispose()


# ----------------------------------------------------------------------------- TrackerCallback


def test_tracker_callback_finished(tr):
    rid = tr.create_run("backbone", status="queued")
    cb = TrackerCallback(tr, rid, flush_every_s=3600)
    state = LoopState(run_id=rid, total_steps=20, epochs=2)
    cb.on_start(state)
    assert tr.get_run(rid)["status"] == "running" and tr.get_run(rid)["started"] is not None
    for i in range(1, 11):
        state.step, state.samples_seen = i, i * 8
        cb.on_step(state, {"train_loss": 1.0 / i, "lr": 1e-3})
    # the first logged step is written at once (the page shows it without waiting), the rest buffered
    assert tr.get_metrics(rid)["step"].tolist() == [1, 1]
    cb.on_eval(state, {"val_acc": 0.6, "val_loss": 0.9})
    assert len(tr.get_metrics(rid)) == 22  # eval flushes the buffer at once
    cb.on_event(state, "early_stop", {"epoch": 0, "patience": 2})
    state.epoch = 1
    for i in range(11, 16):
        state.step = i
        cb.on_step(state, {"train_loss": 1.0 / i})
    cb.on_epoch_end(state, {"val_acc": 0.6})  # flushes; the epoch's metrics came through on_eval already
    assert len(tr.get_metrics(rid)) == 22 + 5
    state.step = 16
    cb.on_step(state, {"train_loss": 0.01})
    state.best_metric, state.best_epoch = 0.6, 0
    state.summary = {"test_acc": 0.55}
    cb.on_end(state, "finished")

    run = tr.get_run(rid)
    assert run["status"] == "finished" and run["ended"] >= run["started"] and run["error"] is None
    assert run["summary"]["best_metric"] == 0.6 and run["summary"]["best_epoch"] == 0
    assert run["summary"]["test_acc"] == 0.55 and run["summary"]["steps"] == 16
    df = tr.get_metrics(rid)
    assert len(df) == 22 + 5 + 1
    assert df[df["name"] == "val_acc"][["step", "epoch"]].values.tolist() == [[10, 0]]
    assert df[df["name"] == "train_loss"]["step"].tolist() == list(range(1, 17))
    assert tr.latest_metrics(rid)["train_loss"] == pytest.approx(0.01)
    assert [e["payload"] for e in tr.get_events(rid, ["early_stop"])] == [{"epoch": 0, "patience": 2}]


def test_the_step_count_moves_every_flush_though_steps_log_every_n(tr):
    """Issue 28: progress moved only every log_every_steps ("step 1/552" for 5 minutes). A flush after unlogged
    steps writes one samples_seen row at the latest step, and only when no row reaches it."""
    rid = tr.create_run("dact")
    cb = TrackerCallback(tr, rid, flush_every_s=3600)
    state = LoopState(run_id=rid, total_steps=100)
    cb.on_start(state)
    state.step, state.samples_seen = 1, 16
    cb.on_step(state, {"train_loss": 1.0})
    for i in range(2, 8):  # steps the loop does not log
        state.step, state.samples_seen = i, 16 * i
        cb.on_step(state, {})
    assert tr.last_steps([rid]) == {rid: 1}
    cb.flush()
    assert tr.last_steps([rid]) == {rid: 7}
    rows = tr.get_metrics(rid, names=["samples_seen"])
    assert rows[["step", "value"]].values.tolist() == [[7, 112.0]]
    cb.flush()  # nothing new: no second row
    assert len(tr.get_metrics(rid, names=["samples_seen"])) == 1
    state.step = 8
    cb.on_step(state, {"train_loss": 0.5})
    cb.flush()  # a logged row reaches the latest step: no marker
    assert len(tr.get_metrics(rid, names=["samples_seen"])) == 1 and tr.last_steps([rid]) == {rid: 8}


def test_tracker_callback_failed_and_periodic_flush(tr):
    rid = tr.create_run("dact")
    tr.update_run(rid, summary={"kept": 1})
    cb = TrackerCallback(tr, rid, flush_every_s=0.0)  # flush at every step
    state = LoopState(run_id=rid)
    cb.on_start(state)
    for i in range(3):
        state.step = i + 1
        cb.on_step(state, {"train_loss": float(i)})
        assert len(tr.get_metrics(rid)) == i + 1
    state.error = "RuntimeError: loss is NaN; lower the learning rate"
    cb.on_end(state, "failed")
    run = tr.get_run(rid)
    assert run["status"] == "failed" and "loss is NaN" in run["error"]
    assert run["summary"]["kept"] == 1 and run["summary"]["best_metric"] is None

    rid2 = tr.create_run("dact")
    cb2 = TrackerCallback(tr, rid2)
    cb2.on_start(LoopState(run_id=rid2))
    cb2.on_end(LoopState(run_id=rid2, extra={"error": "cancelled by user"}), "cancelled")
    assert tr.get_run(rid2)["status"] == "cancelled"


def test_tracker_callback_on_step_only_buffers_and_flushes_once_per_interval(tr, monkeypatch):
    """on_step appends to a buffer; the database is written in ONE batch per ``flush_every_s`` of (monotonic)
    time, never per step. The cost per step is measured by bench/tracker_encoder_timing.py, not here."""
    clock = {"t": 1024.0}  # binary fractions below: the interval arithmetic is exact
    fake_time = types.SimpleNamespace(monotonic=lambda: clock["t"], time=time.time, sleep=time.sleep,
                                      perf_counter=time.perf_counter)
    from dact_lib.tracker import callback as callback_mod

    monkeypatch.setattr(callback_mod, "_time", fake_time)
    writes = []
    real_insert = tr.insert_metric_rows
    monkeypatch.setattr(tr, "insert_metric_rows", lambda rows: writes.append(len(rows)) or real_insert(rows))
    rid = tr.create_run("backbone")
    cb = TrackerCallback(tr, rid, flush_every_s=1 / 16)
    state = LoopState(run_id=rid)
    logs = {"train_loss": 0.5, "lr": 1e-4, "grad_norm": 1.2, "ponder": 0.3}
    n = 3000
    for i in range(n):
        clock["t"] += 1 / 64  # four steps per flush interval
        state.step = i + 1
        cb.on_step(state, logs)
        if i == 2:  # three steps: the first written at once (the page shows it), the next two buffered
            assert writes == [len(logs)] and len(tr.get_metrics(rid)) == len(logs)
    # then one batch of four steps' rows per interval
    assert writes == [len(logs)] + [4 * len(logs)] * ((n - 1) // 4)
    cb.on_step(state, {"train_loss": 0.1})  # inside the interval: buffered ...
    assert len(writes) == 1 + (n - 1) // 4
    cb.flush()  # ... and written by an explicit flush
    assert writes[-1] == ((n - 1) % 4) * len(logs) + 1
    m = tr.get_metrics(rid)
    assert len(m) == n * len(logs) + 1
    assert sorted(set(m["step"])) == list(range(1, n + 1))


def test_pid_liveness_zombies_are_dead_and_other_users_processes_alive(monkeypatch):
    """A zombie (exited, not reaped) counts as dead; a process of another user (kill -> EPERM) counts as alive."""
    import os
    import subprocess
    import sys
    import time as _time

    from dact_lib.tracker import liveness as tr_mod

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = _time.monotonic() + 20
    while _time.monotonic() < deadline:  # wait until it has exited; it stays a zombie until waited for
        with open(f"/proc/{child.pid}/stat", "rb") as fh:
            if b") Z" in fh.read():
                break
        _time.sleep(0.05)
    try:
        assert tr_mod.pid_alive(child.pid) is False
    finally:
        child.wait()
    assert tr_mod.pid_alive(os.getpid()) is True

    def eperm(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tr_mod.os, "kill", eperm)
    assert tr_mod.pid_alive(1) is True


def test_run_scores_shows_each_task_and_labels_the_mean():
    from dact_lib.tracker import run_scores

    multi = {"kind": "multitask", "summary": {
        "best": {"val_accuracy": 0.8, "val_macro_f1": 0.6, "val_accuracy/topic": 0.9, "val_macro_f1/topic": 0.7,
                 "val_accuracy/sentiment": 0.7, "val_loss": 0.3},
        "test": {"test_accuracy/topic": 0.85, "test_accuracy": 0.75}}}
    assert run_scores(multi) == {
        "val_accuracy (mean of tasks)": 0.8, "val_macro_f1 (mean of tasks)": 0.6,
        "test_accuracy (mean of tasks)": 0.75, "test_macro_f1 (mean of tasks)": None,
        "val_accuracy/sentiment": 0.7, "val_accuracy/topic": 0.9, "val_macro_f1/topic": 0.7,
        "test_accuracy/topic": 0.85}
    single = {"kind": "dact", "summary": {"best": {"val_accuracy": 0.9}, "test": {"test_macro_f1": 0.5}}}
    assert run_scores(single) == {"val_accuracy": 0.9, "val_macro_f1": None, "test_accuracy": None,
                                  "test_macro_f1": 0.5}
    assert run_scores({"kind": "backbone", "summary": None})["val_accuracy"] is None


def test_run_scores_of_a_summary_that_is_not_an_object_are_empty(tr):
    """A summary stored as a JSON list, or as text that is not JSON, reads back as it is (end_run keeps it as
    ``previous``): the run table shows no scores for it instead of failing."""
    from dact_lib.tracker import run_scores

    listed, text = tr.create_run("backbone"), tr.create_run("backbone")
    tr.update_run(listed, summary=[0.9, 0.8])
    tr.update_run(text, summary="not json")
    for rid in (listed, text):
        assert set(run_scores(tr.get_run(rid)).values()) == {None}


# ----------------------------------------------------------------------------- several tags per run (issue 26, 5c)


def test_a_run_written_by_an_older_version_with_one_tag_reads_as_one_tag(home):
    """Older DACT Lab wrote one tag string into the run row and config.json: it reads as a one-tag list, filters by
    it, and its config loads as it is."""
    import json
    import sqlite3

    from dact_lib.config import RunConfig, default_config

    Tracker(home)  # the schema
    old_config = {**default_config("dact").to_dict(), "tag": "baseline"}
    conn = sqlite3.connect(home / "experiments.db")
    conn.execute("INSERT INTO runs (kind, name, tag, status, config, created) VALUES "
                 "('dact', 'old run', 'baseline', 'finished', ?, 1.0)", (json.dumps(old_config),))
    conn.commit()
    conn.close()
    tr = Tracker(home)
    (run,) = tr.list_runs()
    assert run["tag"] == "baseline" and run["tags"] == ["baseline"]
    assert [r["id"] for r in tr.list_runs(tag="baseline")] == [run["id"]]
    assert RunConfig.from_dict(run["config"]).tag == "baseline"
    new = tr.create_run("dact", tag=["baseline", "lr-sweep"])
    assert [r["id"] for r in tr.list_runs(tag="baseline")] == [new, run["id"]]


def test_several_tags_are_stored_joined_and_filtered_exactly(tr):
    a = tr.create_run("dact", tag=["sweep", "lr 1e-3", "sweep"], status="finished")  # repeated: once
    b = tr.create_run("backbone", tag="sweep, seed_1", status="finished")  # "a, b" is two tags
    c = tr.create_run("backbone", tag="sweeping", status="finished")
    d = tr.create_run("backbone", status="finished")
    assert tr.get_run(a)["tag"] == "sweep, lr 1e-3" and tr.get_run(a)["tags"] == ["sweep", "lr 1e-3"]
    assert tr.get_run(b)["tags"] == ["sweep", "seed_1"] and tr.get_run(d)["tags"] == [] and tr.get_run(d)["tag"] is None
    assert [r["id"] for r in tr.list_runs(tag="sweep")] == [b, a]  # not "sweeping": whole tags only
    assert [r["id"] for r in tr.list_runs(tag=["sweep", "seed_1"])] == [b]  # every tag given
    assert [r["id"] for r in tr.list_runs(tag="sweep, lr 1e-3")] == [a]
    assert tr.list_runs(tag="seed%1") == [] and tr.list_runs(tag="Sweep") == []  # no wildcards, case counts
    assert [r["id"] for r in tr.list_runs(tag="sweep", limit=1)] == [b]
    assert [r["id"] for r in tr.list_runs(tag="sweeping")] == [c]
    tr.organise(d, tag="x, y,x")  # the Runs page's tag field: commas separate tags
    assert tr.get_run(d)["tags"] == ["x", "y"]
    tr.open_run("dact", None, d, tag=["z"])
    assert tr.get_run(d)["tag"] == "z"
