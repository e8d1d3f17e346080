"""Duplicate groups: connected components of the duplicate pairs, computed in Spark (never on the driver).

Min-label propagation with pointer jumping: every image starts labelled with the smallest id among
itself and its partners; each round takes the smallest label among its partners, then the label of
its label. A chain of length d settles in about log2(d) rounds instead of d.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.runlog import get_logger
from jobs.search.results import Answers, write

log = get_logger("jobs.search")
MAX_ROUNDS = 64


def edges(pairs: DataFrame) -> DataFrame:
    """Both directions of every pair: (node, partner)."""
    forward = pairs.select(F.col("image_a").alias("node"), F.col("image_b").alias("partner"))
    return forward.unionByName(
        forward.select(F.col("partner").alias("node"), F.col("node").alias("partner"))
    ).distinct()


def settle(links: DataFrame, labels: DataFrame) -> DataFrame:
    """One round, (node, before, label): the smallest label among a node's partners and its own, then the label of
    that label (a label is itself a node of the same component, so this only ever shrinks it)."""
    theirs = (
        links.join(labels.withColumnRenamed("node", "partner"), "partner")
        .groupBy("node")
        .agg(F.min("label").alias("theirs"))
    )
    stepped = labels.join(theirs, "node").select("node", "label", F.least("label", "theirs").alias("step"))
    of_step = stepped.select(F.col("node").alias("step"), F.col("step").alias("next"))
    return stepped.join(of_step, "step").select(
        "node", F.col("label").alias("before"), F.least("step", "next").alias("label")
    )


def components(pairs: DataFrame, max_rounds: int = MAX_ROUNDS) -> DataFrame:
    """(image_id, group_id): every image that has a pair, with the smallest image_id of its connected component."""
    links = edges(pairs).localCheckpoint()
    labels = links.groupBy("node").agg(F.least(F.min("partner"), F.first("node")).alias("label")).localCheckpoint()
    for rounds in range(1, max_rounds + 1):
        settled = settle(links, labels).localCheckpoint()
        changed = settled.where(F.col("label") != F.col("before")).count()  # of the checkpoint: no shuffle
        labels = settled.select("node", "label")
        log.info("duplicate groups: round %d, %d labels changed", rounds, changed)
        if not changed:
            break
    else:
        raise RuntimeError(f"duplicate groups did not settle in {max_rounds} rounds")
    return labels.select(F.col("node").alias("image_id"), F.col("label").alias("group_id"))


def group_table(pairs: DataFrame) -> DataFrame:
    """The duplicate groups table: group_id, group_size, image_id, path, label; one row per image that has a pair."""
    members = components(pairs)
    described = (
        pairs.select(F.col("image_a").alias("image_id"), F.col("path_a").alias("path"), F.col("label_a").alias("label"))
        .unionByName(
            pairs.select(
                F.col("image_b").alias("image_id"), F.col("path_b").alias("path"), F.col("label_b").alias("label")
            )
        )
        .dropDuplicates(["image_id"])
    )
    sizes = members.groupBy("group_id").agg(F.count("*").cast("int").alias("group_size"))
    return (
        members.join(sizes, "group_id")
        .join(described, "image_id")
        .select("group_id", "group_size", "image_id", "path", "label")
    )


def duplicate_stats(spark: SparkSession, pairs_uri: str, groups_uri: str | None) -> dict:
    """Images with at least one pair and, with --groups, the groups table written and its shape."""
    pairs = spark.read.parquet(pairs_uri)
    if not groups_uri:
        return {"images_with_pairs": edges(pairs).select("node").distinct().count()}
    write(spark, Answers(group_table(pairs)), groups_uri, by_tasks=False)
    shape = (
        spark.read.parquet(groups_uri)
        .agg(
            F.count("*").alias("images"),
            F.countDistinct("group_id").alias("groups"),
            F.max("group_size").alias("largest"),
        )
        .first()
    )
    return {"images_with_pairs": shape["images"], "groups": shape["groups"], "largest_group": shape["largest"] or 0}
