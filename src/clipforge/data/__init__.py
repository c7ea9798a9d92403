"""clipforge.data: datasets (``shapes``, built corpora, shard directories), formats, curation, and their registry."""
from .datasets import DATASETS, ShapesDataset, build_dataset
from .shapes import HELDOUT_PAIRS, LABEL_VIEWS, SHAPES, COLORS, ShapesGenerator, ShapesSample
from .shards import DataNotBuiltError, ShardDataset, ShardSetWriter, corpus_root, data_home

__all__ = ["DATASETS", "ShapesDataset", "build_dataset", "ShapesGenerator", "ShapesSample", "LABEL_VIEWS",
           "HELDOUT_PAIRS", "SHAPES", "COLORS", "ShardDataset", "ShardSetWriter", "DataNotBuiltError", "corpus_root",
           "data_home"]
