"""The Beam layer: PTransforms and DoFns (`BulkInference`, `JaxModelHandler`), IO, units of work and
commits, dead letters, metrics and progress.  Imports models/, runtime/ and serve/; never tasks/ or the CLI."""
