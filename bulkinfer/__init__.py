"""bulkinfer: bulk (offline) ML inference on Apache Beam with JAX models.

    import bulkinfer
    model = bulkinfer.TextEmbedder.from_name("minilm")
    p | bulkinfer.io.ReadDataset("data/*.jsonl") | bulkinfer.BulkInference(model) | bulkinfer.io.WriteDataset("out/")

Names load on first use, so `import bulkinfer` (and the CLI's --help) stays fast.
"""

import importlib

__version__ = "0.1.0"

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
