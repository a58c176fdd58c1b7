"""Data: the benchmark readers, the normalised tables, their quality suites and their versions.

``model_code.data`` re-exports the tables' and readers' public names (``read_benchmark``,
``read_dataset``, ``read_tables``, ``write_tables``, ``Benchmark``, ``DataError``, ...); the Great
Expectations suites are in ``model_code.data.quality`` and DVC in ``model_code.data.versioning``
(imported from those modules; not re-exported here).
"""

from model_code.data.readers import annotation_files, available_splits, read_benchmark, read_dataset
from model_code.data.tables import (DATASETS, HIDDEN_SPLITS, IMAGE_COLUMNS, LIST_COLUMNS, SPLITS,
                                    TRIPLET_COLUMNS, Benchmark, DataError, MissingImagesError, nulls_as_none,
                                    read_tables, write_tables)

__all__ = ["DATASETS", "HIDDEN_SPLITS", "IMAGE_COLUMNS", "LIST_COLUMNS", "SPLITS",
           "TRIPLET_COLUMNS", "Benchmark", "DataError", "MissingImagesError", "annotation_files", "available_splits",
           "nulls_as_none", "read_benchmark", "read_dataset", "read_tables", "write_tables"]
