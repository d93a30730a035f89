"""`bulkinfer.io`: datasets in and out (the public name of `bulkinfer.beam.io`).

    p | bulkinfer.io.ReadDataset("data/*.jsonl") | ... | bulkinfer.io.WriteDataset("out/")
    from bulkinfer.io import ReadDataset, WriteDataset
"""

from bulkinfer.beam.io import WRITE_FORMATS, ReadDataset, WriteDataset
from bulkinfer.beam.units import READ_FORMATS

__all__ = ["READ_FORMATS", "WRITE_FORMATS", "ReadDataset", "WriteDataset"]
