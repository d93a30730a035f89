"""`python -m bulkinfer.cli`: the same as the `bulkinfer` command."""

from bulkinfer.cli import entry

entry()
