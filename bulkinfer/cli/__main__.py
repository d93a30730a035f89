"""`python -m bulkinfer.cli`: the same as the `bulkinfer` command."""

import sys

from bulkinfer.cli import main

sys.exit(main())
