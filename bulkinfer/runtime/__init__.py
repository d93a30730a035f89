"""The device side: named array inputs, shape buckets, batching, compiled-function cache, pipelined dispatch, sharding.  No Beam."""

from bulkinfer.runtime.buckets import DEFAULT_LENGTHS, Bucketing
from bulkinfer.runtime.busy import BusyClock
from bulkinfer.runtime.engine import Engine, is_out_of_memory
from bulkinfer.runtime.inputs import MASK, InputSpec
from bulkinfer.runtime.sharding import DATA, MODEL
from bulkinfer.runtime.stats import EngineStats

__all__ = ["DATA", "DEFAULT_LENGTHS", "MASK", "MODEL", "Bucketing", "BusyClock", "Engine", "EngineStats", "InputSpec",
           "is_out_of_memory"]
