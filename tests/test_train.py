"""The cells' KMeans on both sides of DRIVER_SAMPLE_BYTES: numpy on the driver for small samples, Spark ML beyond."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_embeddings

from jobs.index import train
from jobs.ivf import cell_scores
from scripts.vectors import clustered_unit_vectors


def quality(vectors: np.ndarray, centroids: np.ndarray) -> float:
    """Mean cosine of each vector to its nearest centroid."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(-cell_scores(unit, centroids, True).min(axis=1).mean())


def test_driver_kmeans_finds_separated_directions_and_each_once():
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.standard_normal((32, 8)))[0].T  # 8 orthonormal directions in 32-d
    data = np.repeat(directions, 50, axis=0) * rng.uniform(0.5, 3, (400, 1)) + 0.05 * rng.standard_normal((400, 32))
    centroids = train.spherical_kmeans(data.astype(np.float32), 8, 10, seed=1)
    assert centroids.dtype == np.float32 and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    matches = centroids @ directions.T
    assert sorted(matches.argmax(axis=1)) == list(range(8)) and matches.max(axis=1).min() > 0.99


@pytest.mark.parametrize("cells", [5, 300])  # k-means++ seeds, then distinct rows at random
def test_driver_kmeans_gives_fewer_cells_where_the_rows_have_fewer_directions(cells):
    rng = np.random.default_rng(2)
    three = rng.standard_normal((3, 16)).astype(np.float32)
    data = np.repeat(three, 20, axis=0) * rng.uniform(1, 2, (60, 1)).astype(np.float32)  # lengths differ, not angles
    centroids = train.spherical_kmeans(data, cells, 10, seed=0)
    assert len(centroids) == 3
    unit = three / np.linalg.norm(three, axis=1, keepdims=True)
    assert np.allclose(np.sort(centroids @ unit.T, axis=1)[:, -1], 1, atol=1e-5)


def test_the_driver_and_spark_ml_train_cells_as_good_on_the_same_sample(spark, tmp_path, monkeypatch):
    vectors, _ = clustered_unit_vectors(3000, dim=64, cluster_size=5, noise=0.6, seed=3)
    write_embeddings(spark, tmp_path / "emb", vectors)
    rows = spark.read.parquet(str(tmp_path / "emb"))
    on_driver = train.train_centroids(rows, 3000, 64, 220, 3000, 10, seed=42)
    monkeypatch.setattr(train, "DRIVER_SAMPLE_BYTES", 3000 * 64 * 4 - 1)  # one byte under the sample: Spark ML
    by_spark = train.train_centroids(rows, 3000, 64, 220, 3000, 10, seed=42)
    for centroids in (on_driver, by_spark):
        assert centroids.shape == (220, 64) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert not np.allclose(on_driver, by_spark)  # two trainers indeed ran
    assert quality(vectors, on_driver) >= quality(vectors, by_spark) - 0.01, (
        quality(vectors, on_driver),
        quality(vectors, by_spark),
    )


def test_the_driver_trains_only_samples_small_in_bytes_and_in_work():
    assert train.on_driver(32768, 1024, 512)  # 64 MiB and 2^34 products: both bounds, just
    assert not train.on_driver(32769, 1024, 512)  # a row more passes both
    assert not train.on_driver(70_000, 2191, 128)  # 34 MiB, but 19.6G products an iteration
    assert train.on_driver(70_000, 2191, 50)  # GloVe 300k: 13 MiB, 7.7G
