"""Datasets of hazy/clear pairs: folder discovery, the offline synthetic set,
TFDS builders (array_record, no TensorFlow) and the grain input pipeline.

Only the light folder utilities are imported here; ``minet_jax.data.builders``
(TFDS) and ``minet_jax.data.pipeline`` (grain) are imported on first use.
"""

from __future__ import annotations

from minet_jax.data.folders import DatasetLayoutError
from minet_jax.data.folders import PairRecord
from minet_jax.data.folders import RESIDE_URL
from minet_jax.data.folders import find_its_pairs
from minet_jax.data.folders import find_paired_folder
from minet_jax.data.folders import find_pairs
from minet_jax.data.folders import find_sots_pairs
from minet_jax.data.folders import load_pair
