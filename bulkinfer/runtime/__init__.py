"""The device side: shape buckets, batching, compiled-function cache, pipelined dispatch.  No Beam."""

from bulkinfer.runtime.buckets import DEFAULT_LENGTHS, Bucketing
from bulkinfer.runtime.engine import Engine, EngineStats

__all__ = ["DEFAULT_LENGTHS", "Bucketing", "Engine", "EngineStats"]
