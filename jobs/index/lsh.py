"""LSH hash functions for `search --method lsh`: a Spark ML BucketedRandomProjectionLSH model, saved in the index."""

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame

from jobs.ivf import rand_unit_vectors
from jobs.knn import LshParams


def fit_and_save(vectors: DataFrame, params: LshParams, seed: int, uri: str) -> np.ndarray:
    """Fit the model (its random projections need one row only), save it at uri, return its unit vectors."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH  # here, as train.py imports KMeans
    from pyspark.ml.functions import array_to_vector

    lsh = BucketedRandomProjectionLSH(
        inputCol="features",
        outputCol="hashes",
        bucketLength=params.bucket_length,
        numHashTables=params.num_hash_tables,
        seed=seed,
    )
    model = lsh.fit(vectors.limit(1).select(array_to_vector("embedding").alias("features")))
    model.write().overwrite().save(uri)
    return rand_unit_vectors(vectors.sparkSession, uri)
