"""The device side: shape buckets, batching, compiled-function cache, pipelined dispatch, sharding.  No Beam."""

from bulkinfer.runtime.buckets import DEFAULT_LENGTHS, Bucketing
from bulkinfer.runtime.engine import Engine, is_out_of_memory
from bulkinfer.runtime.sharding import DATA, MODEL
from bulkinfer.runtime.stats import EngineStats

__all__ = ["DATA", "DEFAULT_LENGTHS", "MODEL", "Bucketing", "Engine", "EngineStats", "is_out_of_memory"]
