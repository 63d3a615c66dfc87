"""`python -m deepmr_dist.cli`: the same as the `deepmr` command."""

import sys

from deepmr_dist.cli import main

sys.exit(main())
