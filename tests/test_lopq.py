"""LOPQModel against NumPy references of LOPQ's formulas and the LOPQ reference fixtures."""
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

import cypq
from cypq import LOPQModel, ModelFileError, NotFittedError

from conftest import clustered

LOPQ_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lopq"
needs_lopq_data = pytest.mark.skipif(not (LOPQ_DATA / "random_test_model.lopq").exists(),
                                     reason="LOPQ reference fixtures not present")


@pytest.fixture(scope="module")
def data():
    return clustered(6000, 32, n_clusters=30, seed=31)


@pytest.fixture(scope="module", params=[False, True], ids=["nopca", "pca"])
def model(request, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return LOPQModel(V=8, M=8, subquantizer_clusters=32, pca=request.param).fit(
            data, random_state=1)


def ref_pca(m, X):
    """The model's PCA of float32 rows X, (X - pca_mean) @ pca_matrix (X without one)."""
    return X if m.pca_matrix is None else (X - m.pca_mean) @ m.pca_matrix


def ref_project(m, x, coarse):
    """LOPQ's formula, per half: R[c] @ (x_half - C[c] - mu[c])."""
    x = ref_pca(m, np.asarray(x, np.float32)[None])[0]
    h = len(x) // 2
    return np.concatenate([m.Rs[s][coarse[s]] @ (x[s * h:(s + 1) * h] - m.Cs[s][coarse[s]]
                                                  - m.mus[s][coarse[s]]) for s in range(2)])


def test_predict_matches_reference(model, data):
    X = data[:300]
    code = model.predict(X)
    Xp = ref_pca(model, X)
    h = Xp.shape[1] // 2
    for s in range(2):
        d = ((Xp[:, None, s * h:(s + 1) * h] - model.Cs[s][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(code.coarse[:, s], d.argmin(1))
    subs = list(model.subquantizers[0]) + list(model.subquantizers[1])
    ds = subs[0].shape[1]
    for i in range(0, 300, 37):
        px = ref_project(model, X[i], code.coarse[i])
        np.testing.assert_allclose(model.project(X[i], code.coarse[i]), px, rtol=1e-4, atol=1e-4)
        want = [((px[m * ds:(m + 1) * ds] - subs[m]) ** 2).sum(1).argmin() for m in range(8)]
        assert tuple(want) == tuple(code.fine[i])
        # single-vector calls give LOPQ's tuples and agree with the batch
        one = model.predict(X[i])
        assert one.coarse == tuple(code.coarse[i]) and one.fine == tuple(code.fine[i])
        assert isinstance(one.coarse[0], int)


def test_reconstruct_matches_reference(model, data):
    code = model.predict(data[:50])
    rec = model.reconstruct(code)
    subs = list(model.subquantizers[0]) + list(model.subquantizers[1])
    for i in range(0, 50, 7):
        c, f = code.coarse[i], code.fine[i]
        sx = np.concatenate([subs[m][f[m]] for m in range(8)])
        h = len(sx) // 2
        x = np.concatenate([model.Rs[s][c[s]].T @ sx[s * h:(s + 1) * h] + model.mus[s][c[s]]
                            + model.Cs[s][c[s]] for s in range(2)])
        if model.pca_matrix is not None:
            x = x @ model.pca_matrix.T + model.pca_mean
        np.testing.assert_allclose(rec[i], x, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(model.reconstruct((tuple(c), tuple(f))), rec[i], atol=1e-4)
    # a good model: reconstruction error far below the data's variance
    assert ((rec - data[:50]) ** 2).sum(1).mean() < 0.2 * data[:50].var(0).sum()


def test_subquantizer_distances(model, data):
    x = data[7]
    c = model.predict_coarse(x)
    dists = model.get_subquantizer_distances(x, c)
    px = ref_project(model, x, c)
    subs = list(model.subquantizers[0]) + list(model.subquantizers[1])
    ds = subs[0].shape[1]
    assert len(dists) == 8
    for m in range(8):
        np.testing.assert_allclose(dists[m], ((px[m * ds:(m + 1) * ds] - subs[m]) ** 2).sum(1),
                                   rtol=1e-3, atol=1e-3)
    half = model.get_subquantizer_distances(x, c, coarse_split=1)
    assert len(half) == 4
    np.testing.assert_allclose(half[0], dists[4], rtol=1e-5)
    assert model.project(x, c, coarse_split=0).shape == (16,)


def test_cell_ids(model):
    assert model.get_cell_id_for_coarse_codes((3, 5)) == 3 * 8 + 5
    assert model.get_coarse_codes_for_cell_id(29) == (3, 5)
    ids = model.get_cell_id_for_coarse_codes(np.array([[1, 2], [7, 7]]))
    np.testing.assert_array_equal(ids, [10, 63])
    np.testing.assert_array_equal(model.get_coarse_codes_for_cell_id(ids), [[1, 2], [7, 7]])


def test_local_rotations_are_orthogonal(model):
    for R in model.Rs:
        for r in R:
            np.testing.assert_allclose(r @ r.T, np.eye(r.shape[0]), atol=1e-4)


def test_fit_deterministic_and_partial(data):
    a = LOPQModel(V=8, M=4, subquantizer_clusters=16).fit(data, random_state=3)
    b = LOPQModel(V=8, M=4, subquantizer_clusters=16, n_threads=1).fit(data, random_state=3)
    assert a == b
    # Only the missing parts are trained; given ones are kept as they are.
    part = LOPQModel(parameters=(a.Cs, None, None, None), M=4, subquantizer_clusters=16)
    part.fit(data, random_state=3)
    assert part.Cs[0] is not None and np.array_equal(part.Cs[0], a.Cs[0])
    assert part == a
    only_subs = LOPQModel(parameters=(a.Cs, a.Rs, a.mus, None), M=4, subquantizer_clusters=16)
    only_subs.fit(data, random_state=3)
    assert only_subs == a


def test_small_and_empty_clusters_shrink_toward_pooled():
    """A cluster with fewer points than dimensions gets the rotation of its covariance shrunk
    toward the half's pooled within-cluster covariance (4d pseudo-points), an empty one the
    pooled covariance's: checked against a NumPy computation of those covariances (each R
    must be orthogonal and diagonalise its covariance)."""
    from cypq.lopq_training import OWN, POOLED, SHRINK_POINTS_PER_DIM, SHRUNK
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (400, 16)), rng.normal(30, 1, (3, 16))]).astype(
        np.float32)
    m = LOPQModel(V=16, M=4, subquantizer_clusters=8).fit(X, random_state=0)
    coarse = m.predict_coarse(X)
    d = 8
    seen = set()
    for h in range(2):
        Xh = X[:, h * d:(h + 1) * d].astype(np.float64)
        res = Xh - m.Cs[h][coarse[:, h]]
        counts = np.bincount(coarse[:, h], minlength=m.V)
        m2 = np.zeros((m.V, d, d))
        for c in range(m.V):
            r = res[coarse[:, h] == c]
            if len(r):
                m2[c] = (r - r.mean(0)).T @ (r - r.mean(0))
        pooled = m2.sum(0) / counts.sum()
        for c in range(m.V):
            src = m.rotation_sources[h][c]
            assert src == (OWN if counts[c] >= d else SHRUNK if counts[c] else POOLED)
            seen.add(int(src))
            k = SHRINK_POINTS_PER_DIM * d
            cov = m2[c] / counts[c] if src == OWN else (m2[c] + k * pooled) / (counts[c] + k)
            R = m.Rs[h][c].astype(np.float64)
            np.testing.assert_allclose(R @ R.T, np.eye(d), atol=1e-5)
            D = R @ cov @ R.T
            off = D - np.diag(np.diag(D))
            assert np.abs(off).max() < 1e-4 * np.abs(np.diag(D)).max()
    assert SHRUNK in seen and OWN in seen       # the small cluster is shrunk, not the identity
    for part in (m.Rs, m.mus):
        assert all(np.isfinite(p).all() for p in part)
    assert np.isfinite(m.reconstruct(m.predict(X))).all()


def test_pickle(model, data):
    again = pickle.loads(pickle.dumps(model))
    assert again == model
    np.testing.assert_array_equal(again.predict(data[:20]).fine, model.predict(data[:20]).fine)


def test_errors(data):
    with pytest.raises(ValueError, match="even"):
        LOPQModel(V=8, M=3)
    with pytest.raises(ValueError, match="fewer than V"):
        LOPQModel(V=64, M=4).fit(data[:10])
    with pytest.raises(ValueError, match="divisible by M"):
        LOPQModel(V=4, M=6, subquantizer_clusters=8).fit(data[:, :20])
    with pytest.raises(NotFittedError, match="fit()"):
        LOPQModel(V=4, M=4).predict(data[:2])
    m = LOPQModel(V=4, M=4, subquantizer_clusters=8).fit(data[:500])
    with pytest.raises(ValueError, match="dimension"):
        m.predict(data[:3, :16])
    with pytest.raises(ValueError, match="NaN"):
        m.predict(np.full((2, 32), np.nan))
    with pytest.raises(ValueError, match="coarse codes"):
        m.reconstruct(((9, 0), (0, 0, 0, 0)))
    with pytest.raises(ValueError, match="Ks=8"):
        m.reconstruct(((1, 0), (0, 0, 0, 99)))
    # one array of coarse and fine codes side by side is not a pair: said so, for a batch of
    # two rows too (unpacked, its rows would have been taken for the coarse and fine codes)
    code = m.predict(data[:2])
    both = np.hstack([code.coarse, code.fine])
    index = cypq.Index.in_memory(m)
    for call in (m.reconstruct, lambda c: index.add_codes(c, [0, 1])):
        with pytest.raises(TypeError, match=r"pair \(coarse \(N, 2\), fine .*shape \(2, 6\)"):
            call(both)
        with pytest.raises(TypeError, match="tuple of 1"):
            call((code.coarse,))
    assert len(index) == 0
    np.testing.assert_allclose(m.reconstruct((both[:, :2], both[:, 2:])), m.reconstruct(code))


# ---------------------------------------------------------------- model files

def test_proto_roundtrip(model, tmp_path):
    path = tmp_path / "m.lopq"
    model.export_proto(str(path))
    again = LOPQModel.load_proto(str(path))
    assert again == model
    buf = io.BytesIO()
    again.export_proto(buf)
    assert buf.getvalue() == path.read_bytes()


@needs_lopq_data
def test_reference_model_reconstruction():
    m = LOPQModel.load_proto(str(LOPQ_DATA / "random_test_model.lopq"))
    assert (m.V, m.M, m.subquantizer_clusters, m.D) == (5, 4, 10, 8)  # header says 256
    np.testing.assert_allclose(
        m.reconstruct(((0, 1), (0, 1, 2, 3))),
        [-2.27444688, 6.47126941, 4.5042611, 4.76683476, 0.83671082, 9.36027283, 8.11780532,
         6.34846377], rtol=1e-6)


@needs_lopq_data
def test_reference_model_bytes_both_ways():
    """Our export equals LOPQ's re-export of the file: the same bytes, except that
    num_subquantizers is taken from the arrays (10), as LOPQ's exporter does."""
    orig = (LOPQ_DATA / "random_test_model.lopq").read_bytes()
    buf = io.BytesIO()
    LOPQModel.load_proto(io.BytesIO(orig)).export_proto(buf)
    field4_256, field4_10 = bytes([0x20, 0x80, 0x02]), bytes([0x20, 0x0A])
    assert orig.count(field4_256) == 1
    assert buf.getvalue() == orig.replace(field4_256, field4_10)


def test_partial_model_loads(data, tmp_path):
    m = LOPQModel(V=4, M=4, subquantizer_clusters=8).fit(data[:500])
    part = LOPQModel(parameters=(m.Cs, None, None, None))
    path = tmp_path / "coarse.lopq"
    part.export_proto(str(path))
    loaded = LOPQModel.load_proto(str(path))
    assert loaded.Rs is None and np.array_equal(loaded.Cs[0], m.Cs[0])
    assert loaded.predict_coarse(data[0]) == m.predict_coarse(data[0])
    with pytest.raises(NotFittedError):
        loaded.predict(data[0])


def test_pca_model_file_readable_by_lopq_readers(data, tmp_path):
    """LOPQ readers skip cypq's PCA fields and see a model of the PCA'd vectors."""
    m = LOPQModel(V=4, M=4, subquantizer_clusters=8, pca=True).fit(data[:800])
    path = tmp_path / "pca.lopq"
    m.export_proto(str(path))
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    # A reader built from LOPQ's schema alone (fields 1-8), as LOPQ's own code has it.
    fdp = descriptor_pb2.FileDescriptorProto(name="lopq_ref.proto", package="lopqref",
                                             syntax="proto2")
    for name, fields in [("Vector", [("values", 1, 2, 3, True)]),
                         ("Matrix", [("values", 1, 2, 3, True), ("shape", 2, 13, 3, False)])]:
        msg = fdp.message_type.add(name=name)
        for fname, num, typ, label, packed in fields:
            f = msg.field.add(name=fname, number=num, type=typ, label=label)
            if packed:
                f.options.packed = True
    p = fdp.message_type.add(name="LOPQModelParams")
    for i, fname in enumerate(["D", "V", "M", "num_subquantizers"], start=1):
        p.field.add(name=fname, number=i, type=13, label=1)
    for i, (fname, t) in enumerate([("Cs", "Matrix"), ("Rs", "Matrix"), ("mus", "Vector"),
                                    ("subs", "Matrix")], start=5):
        p.field.add(name=fname, number=i, type=11, label=3, type_name=f".lopqref.{t}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("lopqref.LOPQModelParams"))
    ref = cls()
    ref.ParseFromString(path.read_bytes())
    assert ref.D == 32 and len(ref.Cs) == 2 and len(ref.Rs) == 8 and len(ref.subs) == 4
    C0 = np.array(ref.Cs[0].values, np.float32).reshape(tuple(ref.Cs[0].shape))
    np.testing.assert_array_equal(C0, m.Cs[0])
    # what such a reader must do: apply the PCA, then use the model as stored
    again = LOPQModel.load_proto(str(path))
    assert again == m


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b"", "no LOPQ model parameters"),
    (lambda b: b"\xff\xff\xff\xff garbage", "truncated or corrupt|no LOPQ"),
])
def test_corrupt_files(model, mutate, msg):
    buf = io.BytesIO()
    model.export_proto(buf)
    with pytest.raises(ModelFileError, match=msg):
        LOPQModel.load_proto(mutate(buf.getvalue()))


def test_inconsistent_file():
    from cypq.proto import lopq_model_pb2 as pb
    p = pb.LOPQModelParams()
    c = p.Cs.add()
    c.values.extend([1.0, 2.0, 3.0])
    c.shape.extend([2, 2])
    with pytest.raises(ModelFileError, match="shape"):
        LOPQModel.load_proto(p.SerializeToString())


LOPQ_SIDE_BY_SIDE = """
import sys
from google.protobuf import descriptor_pb2, descriptor_pool

def register_lopqs_module():
    # what LOPQ's generated lopq_model_pb2 does: lopq_model.proto in the default pool
    fd = descriptor_pb2.FileDescriptorProto(name="lopq_model.proto",
                                            package="com.flickr.vision.lopq")
    m = fd.message_type.add(name="Vector")
    m.field.add(name="values", number=1, type=2, label=3)
    descriptor_pool.Default().Add(fd)

if sys.argv[1] == "lopq-first":
    register_lopqs_module()
import numpy as np, cypq
if sys.argv[1] == "cypq-first":
    register_lopqs_module()
rng = np.random.default_rng(0)
m = cypq.LOPQModel(V=4, M=4, subquantizer_clusters=8).fit(
    rng.normal(size=(500, 8)).astype(np.float32), random_state=0)
assert cypq.LOPQModel.from_proto_bytes(m.to_proto_bytes()) == m
print("ok")
"""


@pytest.mark.parametrize("order", ["lopq-first", "cypq-first"])
def test_loads_beside_lopqs_generated_module(order):
    """A process that also loads LOPQ's generated module (lopq_model.proto in protobuf's
    default pool) imports cypq and reads and writes model files, in either order."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", LOPQ_SIDE_BY_SIDE, order],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_pca_dim_reduces_and_round_trips(tmp_path):
    """pca_dim keeps the leading PCA directions, split into halves of balanced eigenvalue
    products (checked against NumPy's eigendecomposition); the model works in pca_dim
    dimensions, takes vectors of the input dimension, and its file loads with the PCA."""
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(24, 24)))[0]
    X = (rng.normal(size=(3000, 24)) * np.linspace(5, 0.1, 24)) @ basis.T
    X = X.astype(np.float32)
    m = LOPQModel(V=8, M=4, subquantizer_clusters=16, pca_dim=8).fit(X, random_state=0)
    assert m.pca and m.pca_matrix.shape == (24, 8) and m.model_dim == 8 and m.D == 24
    P = m.pca_matrix.astype(np.float64)
    np.testing.assert_allclose(P.T @ P, np.eye(8), atol=1e-5)
    w, v = np.linalg.eigh(np.cov(X.astype(np.float64), rowvar=False))
    top = v[:, np.argsort(w)[::-1][:8]]            # the 8 leading directions
    np.testing.assert_allclose(np.abs(top.T @ P).max(axis=0), 1.0, atol=1e-4)
    code = m.predict(X[:50])
    assert code.fine.shape == (50, 4)
    assert m.reconstruct(code).shape == (50, 24)
    m.export_proto(tmp_path / "m.lopq")
    again = LOPQModel.load_proto(tmp_path / "m.lopq")
    assert again == m and again.pca_dim == 8
    np.testing.assert_array_equal(again.predict(X[:50]).fine, code.fine)
    for bad, msg in ((dict(pca_dim=7), "even"), (dict(pca_dim=6), "divisible by M=4")):
        with pytest.raises(ValueError, match=msg):
            LOPQModel(V=8, M=4, **bad)
    with pytest.raises(ValueError, match="less than the dimension"):
        LOPQModel(V=8, M=4, subquantizer_clusters=16, pca_dim=24).fit(X)


def test_defaults_chosen_from_the_data():
    """V and the PCA, when not given, are chosen by fit from the training data: V the
    largest power of two <= n / (64 f) (n / (512 sqrt(f)) for 4-bit codes), f = max(1,
    D / 128), within [8, 1024]; a PCA to D/3 rounded up to a multiple of 2M (at most D/2, at least
    2M) from 256 dimensions on; explicit settings and given parts win."""
    from cypq.lopq_parts import auto_pca_dim, auto_V
    assert [auto_V(n) for n in (10, 600, 20_000, 100_000, 10 ** 7)] == [8, 8, 256, 1024, 1024]
    assert auto_V(64 * 300) == 256 and auto_V(64 * 256) == 256 and auto_V(64 * 255) == 128
    # 4-bit codes: eight times the points per centroid (at D <= 128)
    assert [auto_V(n, 16) for n in (20_000, 100_000, 512 * 128, 512 * 128 - 1)] == \
        [32, 128, 128, 64]
    assert auto_V(100_000, 17) == 1024
    # higher dimensions: f = D / 128 times the points per centroid (below 128: f = 1), 4-bit
    # codes sqrt(f) times
    assert auto_V(20_000, 256, 384) == 64 and auto_V(20_000, 16, 384) == 16
    assert auto_V(100_000, 16, 128) == 128 and auto_V(20_000, 256, 64) == 256
    assert auto_V(3 * 64 * 256, 256, 384) == 256 and auto_V(3 * 64 * 256 - 1, 256, 384) == 128
    assert auto_V(2 * 512 * 16, 16, 512) == 16 and auto_V(2 * 512 * 16 - 1, 16, 512) == 8
    assert auto_pca_dim(128, 16) is None and auto_pca_dim(384, 16) == 128
    assert auto_pca_dim(384, 48) == 192 and auto_pca_dim(300, 16) == 128
    assert auto_pca_dim(256, 3) == 90 and auto_pca_dim(768, 64) == 256
    assert auto_pca_dim(300, 24) == 144 and auto_pca_dim(768, 96) == 384
    # D/3 rounded up passes D/2 (rounded down to a multiple of M): D/2; below 2M: none
    assert auto_pca_dim(384, 96) == 192 and auto_pca_dim(384, 128) is None
    rng = np.random.default_rng(0)
    small = rng.standard_normal((3000, 16)).astype(np.float32)
    m = LOPQModel(M=4, subquantizer_clusters=32).fit(small, random_state=0)
    assert m.V == 32 and not m.pca and m.pca_matrix is None
    assert LOPQModel(M=4, subquantizer_clusters=16).fit(small, random_state=0).V == 8
    wide = rng.standard_normal((1200, 256)).astype(np.float32)
    m = LOPQModel(M=8, subquantizer_clusters=32).fit(wide, random_state=0)
    assert (m.V, m.pca_dim, m.model_dim, m.D) == (8, 96, 96, 256)   # 1200 / (64 x 2)
    m = LOPQModel(M=8, subquantizer_clusters=16, pca=False).fit(wide, random_state=0)
    assert m.pca_matrix is None and m.model_dim == 256
    m = LOPQModel(V=4, M=8, subquantizer_clusters=16, pca_dim=64).fit(wide, random_state=0)
    assert (m.V, m.model_dim) == (4, 64)
    # a model given its coarse quantizers trains no PCA in front of them
    C = tuple(np.ascontiguousarray(wide[:8, h * 128:(h + 1) * 128]) for h in range(2))
    m = LOPQModel(M=8, subquantizer_clusters=16, parameters=(C, None, None, None))
    assert m.pca is False and m.V == 8
    assert m.fit(wide, random_state=0).model_dim == 256
