"""The `cypq` command end to end, and its behaviour on user errors (one line, exit 2)."""
import io
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from cypq import Index, LOPQModel
from cypq.cli import main

from conftest import clustered
from test_bulk import write_texmex


@pytest.fixture()
def files(tmp_path):
    X = clustered(6000, 16, n_clusters=15, seed=71)
    Q = clustered(30, 16, n_clusters=15, seed=72)
    np.save(tmp_path / "base.npy", X)
    write_texmex(tmp_path / "q.fvecs", Q, "<f4")
    d = ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.save(tmp_path / "gt.npy", np.argsort(d, axis=1)[:, :100].astype(np.int32))
    return tmp_path, X, Q


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_build_search_info_export_bench_add(files, capsys, monkeypatch):
    tmp, X, Q = files
    code, out, _ = run(capsys, "train", tmp / "base.npy", "-o", tmp / "m.lopq", "--V", 8,
                       "--M", 4, "--S", 16, "--sample", 3000, "--seed", 3)
    assert code == 0 and "wrote" in out
    # training shows its phases by default (with the seconds since it started)
    phases = [line for line in out.splitlines() if line.startswith("  LOPQ: ")]
    assert [p.split(":")[1].split(",")[0].split(" (")[0].strip() for p in phases] == [
        "coarse quantizers", "local rotations", "half 0", "4 fine subquantizers of 16"]
    assert all(p.endswith(" s)") for p in phases)
    model = LOPQModel.load_proto(tmp / "m.lopq")
    assert (model.V, model.M, model.subquantizer_clusters, model.D) == (8, 4, 16, 16)

    code, out, _ = run(capsys, "build", tmp / "ix", tmp / "base.npy", "--model", tmp / "m.lopq",
                       "--chunk", 1000, "-q")
    assert code == 0 and "vectors: 6,000" in out
    with Index.open(tmp / "ix", readonly=True) as ix:
        assert ix.model == model and len(ix) == 6000
        D_ref, I_ref = ix.search(Q, k=5, quota=500)

    # search: printed, from a file and from stdin; and to .npy
    code, out, _ = run(capsys, "search", tmp / "ix", tmp / "q.fvecs", "-k", 5, "--quota", 500)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(Q)
    first = [int(t.split(":")[0]) for t in lines[0].split("\t")[1].split()]
    assert first == I_ref[0].tolist()
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "\n".join(" ".join(f"{v:.9g}" for v in q) for q in Q[:3]) + "\n"))
    code, out, _ = run(capsys, "search", tmp / "ix", "-", "-k", 5, "--quota", 500)
    assert code == 0 and out.strip().splitlines() == lines[:3]
    code, out, _ = run(capsys, "search", tmp / "ix", tmp / "q.fvecs", "-k", 5, "--quota", 500,
                       "--out", tmp / "I.npy", "--distances-out", tmp / "D.npy")
    assert np.array_equal(np.load(tmp / "I.npy"), I_ref)
    assert np.array_equal(np.load(tmp / "D.npy"), D_ref)

    code, out, _ = run(capsys, "info", tmp / "ix")
    assert code == 0 and "V=8" in out and "6,000 vectors" in out
    assert "codes: 4-bit, two per byte (2 bytes per vector)" in out   # built by the CLI: packed
    # --no-pack: a byte per code (cypq 0.2 reads it), the same search results
    code, out, _ = run(capsys, "build", tmp / "ix-bytes", tmp / "base.npy", "--model",
                       tmp / "m.lopq", "--chunk", 1000, "-q", "--no-pack")
    with Index.open(tmp / "ix-bytes", readonly=True) as ix:
        assert not ix.packed and ix.storage.code_width == 4
        D_b, I_b = ix.search(Q, k=5, quota=500)
    np.testing.assert_allclose(D_b, D_ref, rtol=1e-5, atol=1e-4)
    assert (I_b == I_ref).mean() > 0.95
    code, out, _ = run(capsys, "info", tmp / "ix-bytes")
    assert "codes: 4 x uint8" in out
    code, out, _ = run(capsys, "export", tmp / "ix", "-o", tmp / "again.lopq")
    assert code == 0 and (tmp / "again.lopq").read_bytes() == (tmp / "m.lopq").read_bytes()
    code, out, _ = run(capsys, "export", tmp / "ix", "-o", tmp / "m.pkl")
    code, out, _ = run(capsys, "info", tmp / "m.pkl")
    assert code == 0 and "V=8" in out

    # bench: the recall it prints is the recall of the search against the ground truth
    pytest.importorskip("matplotlib")
    code, out, _ = run(capsys, "bench", tmp / "ix", tmp / "q.fvecs", tmp / "gt.npy",
                       "--quotas", 500, 6000, "--repeat", 1, "--plot", tmp / "p.png")
    assert code == 0 and (tmp / "p.png").read_bytes()[:4] == b"\x89PNG"
    row = [r for r in out.splitlines() if r.startswith("| 6000 |")][0].split("|")
    with Index.open(tmp / "ix", readonly=True) as ix:
        _, I = ix.search(Q, k=100, quota=6000)
    gt = np.load(tmp / "gt.npy")
    assert float(row[3]) == pytest.approx(np.mean((I[:, :10] == gt[:, :1]).any(1)), abs=1e-3)

    # add: ids continue after the largest
    np.save(tmp / "more.npy", X[:50])
    code, out, _ = run(capsys, "add", tmp / "ix", tmp / "more.npy", "--batch", 20)
    assert code == 0 and "6000 .. 6049" in out
    with Index.open(tmp / "ix", readonly=True) as ix:
        assert len(ix) == 6050 and ix.contains([6049]).all()


def test_build_with_train_equals_train_then_build(files, capsys):
    tmp, X, _ = files
    opts = ["--V", 8, "--M", 4, "--S", 16, "--sample", 2000, "--seed", 5]
    assert run(capsys, "build", tmp / "a", tmp / "base.npy", "--train", "-q", *opts)[0] == 0
    code, out, _ = run(capsys, "train", tmp / "base.npy", "-o", tmp / "m.lopq", "-q", *opts)
    assert code == 0 and "wrote" in out and "  LOPQ: " not in out   # -q: no phase lines
    with Index.open(tmp / "a", readonly=True) as ix:
        assert ix.model == LOPQModel.load_proto(tmp / "m.lopq")


@pytest.mark.parametrize("argv,message", [
    (["search", "{t}/nope", "{t}/q.fvecs"], "not a cypq index"),
    (["search", "{t}/ix", "{t}/missing.npy"], "missing.npy"),
    (["build", "{t}/new", "{t}/base.npy"], "--model"),
    (["build", "{t}/new", "{t}/base.npy", "--train"], "training needs --M"),
    (["build", "{t}/ix", "{t}/base.npy", "--model", "{t}/m.lopq"], "complete index"),
    (["build", "{t}/new", "{t}/base.npy", "--model", "{t}/garbage.lopq"], "garbage.lopq"),
    (["train", "{t}/base.npy", "-o", "{t}/x.lopq", "--V", "8", "--M", "3"], "M must be even"),
    (["info", "{t}/garbage.lopq"], "garbage.lopq"),
    (["search", "{t}/ix", "{t}/small.npy"], "dimension 4"),
    (["add", "{t}/ix", "{t}/small.npy"], "dimension 4"),
    (["bench", "{t}/ix", "{t}/q.fvecs", "{t}/small.npy"], "groundtruth"),
    # outputs are checked before the search runs
    (["search", "{t}/ix", "{t}/q.fvecs", "--out", "{t}/nodir/I.npy"], "no such directory"),
    (["search", "{t}/ix", "{t}/q.fvecs", "--out", "{t}"], "is a directory"),
    (["search", "{t}/ix", "{t}/q.fvecs", "--out", "{t}/I.npy", "--distances-out",
      "{t}/nodir/D.npy"], "--distances-out"),
    (["search", "{t}/ix", "{t}/q.fvecs", "--distances-out", "{t}/D.npy"], "needs --out"),
    (["train", "{t}/base.npy", "-o", "{t}/nodir/x.lopq", "--V", "8", "--M", "4"],
     "no such directory"),
    (["bench", "{t}/ix", "{t}/q.fvecs", "{t}/gt.npy", "--plot", "{t}/nodir/p.png"],
     "no such directory"),
    (["export", "{t}/ix", "-o", "{t}/nodir/x.lopq"], "no such directory"),
])
def test_user_errors_are_one_line(files, capsys, monkeypatch, argv, message):
    tmp, X, _ = files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = LOPQModel(V=4, M=4, subquantizer_clusters=16).fit(X[:1000], random_state=0)
    model.export_proto(tmp / "m.lopq")
    Index.create(tmp / "ix", model).close()
    (tmp / "garbage.lopq").write_bytes(b"\x08\x01\x12\xff\xff garbage")
    np.save(tmp / "small.npy", X[:3, :4])

    def no_search(*args, **kwargs):   # each of these errors is found before any search
        raise AssertionError("searched")
    monkeypatch.setattr(Index, "search", no_search)
    code, out, err = run(capsys, *[a.format(t=tmp) for a in argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_installed_commands_and_help():
    for sub in ("", "train", "build", "add", "search", "info", "export", "bench", "demo"):
        r = subprocess.run([sys.executable, "-m", "cypq", *([sub] if sub else []), "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage: cypq" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cypq", "frobnicate"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for exe in ("cypq", "cypq-bulk-load"):
        path = shutil.which(exe, path=os.path.dirname(sys.executable) + os.pathsep
                            + os.environ.get("PATH", ""))
        if path is None:
            pytest.skip(f"{exe} is not on PATH (package not installed with pip)")
        r = subprocess.run([path, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: cypq" in r.stdout


def test_demo_reports_true_recall(tmp_path, capsys):
    """`cypq demo`: the packaged ground truth is exact, and the recall printed is the recall
    of the index it built."""
    from cypq.demo import load_sample
    data = load_sample()
    base = data["base"].astype(np.float32)
    q = data["query"].astype(np.float32)
    d = (q ** 2).sum(1)[:, None] - 2 * q @ base.T + (base ** 2).sum(1)[None, :]
    nn = np.argsort(d, axis=1, kind="stable")[:, :10]
    exact = np.sort(d, axis=1)[:, :10]
    gt = data["groundtruth"][:, :10]
    # ties aside, the stored ground truth is the brute-force answer
    assert np.allclose(np.take_along_axis(d, gt.astype(np.int64), 1), exact, rtol=1e-5)
    assert np.mean(nn[:, 0] == gt[:, 0]) > 0.97
    code = main(["demo", "--dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0 and "| 2000 |" in out
    with Index.open(tmp_path / "demo", readonly=True) as ix:
        assert len(ix) == len(base)
        _, I = ix.search(q, k=100, quota=2000)
    r10 = np.mean((I[:, :10] == data["groundtruth"][:, :1]).any(1))
    row = [r for r in out.splitlines() if r.startswith("| 2000 |")][0].split("|")
    assert float(row[3]) == pytest.approx(r10, abs=1e-3) and r10 > 0.9


def test_import_needs_no_pyspark():
    """cypq and its command import without pyspark; cypq.spark says what to install."""
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "import cypq, cypq.cli, cypq.bulk\n"
            "try:\n    import cypq.spark\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pip install 'cypq[spark]'" in r.stdout


def test_numbers_and_inputs_at_the_edges(files, capsys):
    """Counts below 1 are refused by the parser before anything is created; complex vectors
    and ids outside [0, 2**63-1] are refused; id 2**63-1 itself is stored and found."""
    tmp, X, Q = files
    code, _, _ = run(capsys, "train", tmp / "base.npy", "-o", tmp / "m.lopq", "--V", 4,
                     "--M", 4, "--S", 16, "--sample", 2000)
    assert code == 0
    for argv in (["bench", tmp / "ix", tmp / "q.fvecs", tmp / "gt.npy", "--repeat", 0],
                 ["add", tmp / "ix", tmp / "base.npy", "--batch", 0],
                 ["build", tmp / "ix", tmp / "base.npy", "--model", tmp / "m.lopq",
                  "--threads", 0],
                 ["search", tmp / "ix", tmp / "q.fvecs", "-k", 0]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
        assert not (tmp / "ix").exists()
    np.save(tmp / "complex.npy", X[:100].astype(np.complex64))
    code, _, err = run(capsys, "build", tmp / "ix", tmp / "complex.npy", "--model",
                       tmp / "m.lopq", "-q")
    assert code == 2 and "real numbers" in err and err.count("\n") == 1
    top = np.iinfo(np.int64).max
    for bad, shown in ((np.arange(6000, dtype=np.int64) - 1, "-1"),
                       (np.arange(6000, dtype=np.uint64) + np.uint64(top - 10), str(top + 5989))):
        np.save(tmp / "ids.npy", bad)
        code, _, err = run(capsys, "build", tmp / "ix", tmp / "base.npy", "--model",
                           tmp / "m.lopq", "--ids", tmp / "ids.npy", "-q")
        assert code == 2 and "2**63-1" in err and shown in err
        assert not Index.exists(tmp / "ix")
    ids = np.arange(6000, dtype=np.int64)
    ids[-1] = top
    np.save(tmp / "ids.npy", ids)
    code, _, _ = run(capsys, "build", tmp / "ix", tmp / "base.npy", "--model", tmp / "m.lopq",
                     "--ids", tmp / "ids.npy", "-q")
    assert code == 0
    with Index.open(tmp / "ix") as ix:
        assert ix.contains([top]).all() and len(ix) == 6000
        assert top in ix.search(X[-1:], k=6000, quota=0)[1]   # every entry ranked
        with pytest.raises(OverflowError, match="give your own ids"):
            ix.add(X[:2])                         # no fresh ids after 2**63-1
        assert len(ix) == 6000
        with pytest.raises(ValueError, match="at most 6,000"):
            ix.search(Q, k=10**9)                 # refused before anything is allocated
        assert ix.remove([top]) == 1
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "cypq 0." in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_is_said_and_loses_nothing(tmp_path):
    """An add that does not fit on the disk says the disk is full; every add before it is
    still there (a 1 MB tmpfs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        X = clustered(60000, 16, n_clusters=12, seed=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model = LOPQModel(V=6, M=4, subquantizer_clusters=16).fit(X[:3000], random_state=1)
        stored = 0
        with Index.create(mnt / "ix", model, map_size=1 << 19, stage_capacity=0) as ix:
            with pytest.raises(OSError, match="disk holding .* is full.*intact") as e:
                for s in range(0, len(X), 2000):
                    ix.add(X[s:s + 2000])
                    stored += 2000
            assert e.value.errno == 28 and 0 < stored < len(X) and len(ix) == stored
        with Index.open(mnt / "ix", readonly=True) as ix:
            assert len(ix) == stored and ix.contains(np.arange(stored)).all()
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_metric_through_train_and_build(files, capsys, metric):
    """`--metric` reaches the model file and the bulk-loaded index, whose searches rank by
    that metric (largest first) as the Python API does."""
    tmp, X, Q = files
    assert run(capsys, "train", tmp / "base.npy", "-o", tmp / "m.lopq", "--V", 8, "--M", 4,
               "--S", 16, "--metric", metric)[0] == 0
    model = LOPQModel.load_proto(tmp / "m.lopq")
    assert model.metric == metric
    assert run(capsys, "build", tmp / "ix", tmp / "base.npy", "--model", tmp / "m.lopq",
               "-q")[0] == 0
    mem = Index.in_memory(model)
    mem.add(X)
    with Index.open(tmp / "ix", readonly=True) as ix:
        assert ix.model.metric == metric
        D, I = ix.search(Q, k=5, quota=0)
        Dm, Im = mem.search(Q, k=5, quota=0)
        np.testing.assert_array_equal(I, Im)
        np.testing.assert_array_equal(D, Dm)
        assert (np.diff(D, axis=1) <= 0).all()
