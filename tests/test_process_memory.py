"""What a searching process holds: scipy (its BLAS serves encoding only) stays unloaded, its
BLAS is still held to one thread inside the encode kernels, and freed heap goes back."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cypq import Index, LOPQModel

from conftest import clustered


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (a process's modules and memory are its own)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_searching_an_index_loads_no_scipy(tmp_path):
    X = clustered(1500, 64, seed=3)
    model = LOPQModel(V=4, M=4).fit(X, random_state=0)    # 32-dim halves: sgemm in encode
    with Index.create(tmp_path / "ix", model, vectors="float32") as index:
        index.add(X)
    np.save(tmp_path / "q.npy", X[:20])
    out = _run(f"""
        import sys
        import numpy as np
        import cypq
        with cypq.Index.open({str(tmp_path / 'ix')!r}, readonly=True) as index:
            D, I = index.search(np.load({str(tmp_path / 'q.npy')!r}), k=5, quota=200,
                                rerank=10)
        print(int((I[:, 0] == np.arange(20)).sum()))
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))
    """).split("\n")
    assert out[0] == "20"       # the search worked: every query finds itself first
    assert out[1] == "[]"


def test_encode_loads_scipy_blas_and_holds_it_to_one_thread():
    """The first encode with subspaces of >= BLAS_MIN_DIM dims loads scipy's BLAS; a BLAS limit
    made before that (the controller caches the libraries it found) still reaches it."""
    out = _run("""
        import sys
        import numpy as np
        from threadpoolctl import threadpool_info
        from cypq import _quantize
        from cypq._threads import blas_threads, single_threaded_blas
        with blas_threads(1):                  # a controller made before scipy's BLAS loads
            pass
        print('scipy.linalg' in sys.modules)
        rng = np.random.default_rng(0)
        Ds = _quantize.BLAS_MIN_DIM
        X = rng.normal(size=(300, 2 * Ds)).astype(np.float32)
        C = rng.normal(size=(2, 16, Ds)).astype(np.float32)
        codes = np.empty((300, 2), np.uint8)
        with single_threaded_blas():
            _quantize.encode(X, C, codes, np.empty(0, np.float32), 2)
            held = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']
        print('scipy.linalg' in sys.modules, held)
        d = ((X.reshape(300, 2, 1, Ds) - C[None]) ** 2).sum(-1)
        print((codes == d.argmin(-1)).all())
    """).split("\n")
    assert out[0] == "False"
    loaded, held = out[1].split(" ", 1)
    assert loaded == "True"
    assert held.startswith("[") and held != "[]" and set(eval(held)) == {1}   # scipy's too
    assert out[2] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_hands_freed_heap_back():
    out = _run("""
        import numpy as np
        from cypq._heap import _TRIM, release_free_memory
        def rss_anon():
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) for l in f if l.startswith('RssAnon:')) / 1024
        if _TRIM is None:            # not glibc: nothing to hand back
            print('skip'); raise SystemExit
        big = np.ones(30 << 17)      # 30 MB freed: glibc's threshold for mapping rises to it
        del big
        keep = [np.ones(1 << 17) for _ in range(40)]   # 40 blocks of 1 MB from the heap
        before = rss_anon()
        del keep
        release_free_memory(1 << 20)                   # below the threshold: kept
        kept = rss_anon()
        release_free_memory(40 << 20)
        print(before - kept, before - rss_anon())
    """).split()
    if out[0] == "skip":
        pytest.skip("malloc_trim not available")
    kept, returned = map(float, out)
    assert returned > 30 and kept < 10
