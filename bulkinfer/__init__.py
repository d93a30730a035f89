"""bulkinfer: bulk (offline) ML inference on Apache Beam with JAX models.

    import bulkinfer
    model = bulkinfer.TextEmbedder.from_name("minilm")
    p | bulkinfer.io.ReadDataset("data/*.jsonl") | bulkinfer.BulkInference(model) | bulkinfer.io.WriteDataset("out/")
"""

from bulkinfer import io
from bulkinfer.batch import Batch, Rebatch, Unbatch
from bulkinfer.handler import JaxModelHandler
from bulkinfer.tasks.embed import TextEmbedder
from bulkinfer.transform import BulkInference

__all__ = ["Batch", "BulkInference", "JaxModelHandler", "Rebatch", "TextEmbedder", "Unbatch", "io"]
__version__ = "0.1.0"
