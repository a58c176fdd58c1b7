"""The dataset partitions every per-dataset asset shares (DESIGN.md §3)."""

import dagster as dg

from model_code.data import DATASETS

dataset_partitions = dg.StaticPartitionsDefinition(list(DATASETS))
