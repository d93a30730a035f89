"""Bulk-inference jobs built from models, the runtime and the Beam transforms."""
