"""bulkinfer: bulk (offline) ML inference on Apache Beam with JAX models.

    import bulkinfer
    model = bulkinfer.TextEmbedder.from_name("minilm")
    p | bulkinfer.io.ReadDataset("data/*.jsonl") | bulkinfer.BulkInference(model) | bulkinfer.io.WriteDataset("out/")

Names load on first use, so `import bulkinfer` (and the CLI's --help) stays fast.
"""

import importlib
import logging

__version__ = "0.1.0"


def _not_apitools_warning(record: logging.LogRecord) -> bool:
    """False for the warning Beam logs on the root logger when importing its BigQuery clients without
    apitools, which jobs that never touch BigQuery cannot act on; True for every other record.  Reads
    the record's format string only (never formats it: a filter's error would reach the caller)."""
    return not (isinstance(record.msg, str) and record.msg.startswith("apitools not found"))


# Beam logs that warning on its first import (`apache_beam.io.gcp.internal.clients.bigquery`), from
# whichever bulkinfer module imports Beam first; the filter keeps it out of a user's console.
logging.getLogger().addFilter(_not_apitools_warning)

_EXPORTS = {
    "Batch": "bulkinfer.beam.batch",
    "BulkInference": "bulkinfer.beam.transform",
    "Guarded": "bulkinfer.beam.guard",
    "decode_image": "bulkinfer.models.images",
    "Evaluate": "bulkinfer.tasks.evaluate_transform",
    "JaxModel": "bulkinfer.models.jax_model",
    "JaxModelHandler": "bulkinfer.beam.handler",
    "Rebatch": "bulkinfer.beam.batch",
    "Statistics": "bulkinfer.tasks.stats_transform",
    "Generator": "bulkinfer.models.generator",
    "SamplingParams": "bulkinfer.runtime.sampling",
    "TextEmbedder": "bulkinfer.models.text",
    "Unbatch": "bulkinfer.beam.batch",
    "io": "bulkinfer.io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bulkinfer' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "io" else getattr(module, name)


def __dir__():
    return __all__
