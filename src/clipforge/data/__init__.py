"""clipforge.data: datasets (``shapes``, built corpora, shard directories), formats, curation, and their registry.

Datasets register in ``DATASETS`` when their module is imported; the imports below are that
registration, in one place: ``datasets`` (``shapes``), ``shapes_long`` (``shapes_long``) and
``shards`` (``shards`` and every built corpus of :data:`clipforge.data.corpora.BUILDERS` that
names a dataset). No module of the package imports another for its side effect.
"""
from . import shapes_long  # noqa: F401  (registers shapes_long)
from .datasets import DATASETS, ShapesDataset, build_dataset
from .shapes import COLORS, HELDOUT_PAIRS, LABEL_VIEWS, SHAPES, ShapesGenerator, ShapesSample
from .shards import DataNotBuiltError, ShardDataset, ShardSetWriter, corpus_root, data_home

__all__ = ["DATASETS", "ShapesDataset", "build_dataset", "ShapesGenerator", "ShapesSample", "LABEL_VIEWS",
           "HELDOUT_PAIRS", "SHAPES", "COLORS", "ShardDataset", "ShardSetWriter", "DataNotBuiltError", "corpus_root",
           "data_home"]
