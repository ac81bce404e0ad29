import numpy as np
import pytest


def clustered(n, d, n_clusters=20, seed=0, scale=10.0):
    """Gaussian blobs: data with structure, like real descriptors, and no exact ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, scale, (n_clusters, d))
    lab = rng.integers(0, n_clusters, n)
    return (centres[lab] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def n_threads(request):
    return request.param
