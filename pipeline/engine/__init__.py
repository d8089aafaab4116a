"""The engine: a model-agnostic DAG runner, its cache entries, chunk pool, locks, failpoints, and the cache's
mirror on object storage.

It imports nothing from the rest of `pipeline`; stages and jobs build on it, never the other way round.
"""

from .cache import Artifact, InputCorrupt, write_chunk_list
from .chunks import ChunkFile, ChunkPool
from .dag import CACHED, CONTENT, SINK, WHOLE, Incomplete, Runner, Stage, StageContext, StageReport, topological_order
from .failpoints import failpoint

__all__ = ["Artifact", "CACHED", "CONTENT", "ChunkFile", "ChunkPool", "Incomplete", "InputCorrupt", "Runner",
           "SINK", "Stage", "StageContext", "StageReport", "WHOLE", "failpoint", "topological_order",
           "write_chunk_list"]
