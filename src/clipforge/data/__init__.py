"""clipforge.data: datasets (``shapes`` and the registry others plug into)."""
from .datasets import DATASETS, ShapesDataset, build_dataset
from .shapes import HELDOUT_PAIRS, LABEL_VIEWS, SHAPES, COLORS, ShapesGenerator, ShapesSample

__all__ = ["DATASETS", "ShapesDataset", "build_dataset", "ShapesGenerator", "ShapesSample", "LABEL_VIEWS",
           "HELDOUT_PAIRS", "SHAPES", "COLORS"]
