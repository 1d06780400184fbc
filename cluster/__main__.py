"""``python -m cluster``: the same ``launch``, ``doctor`` and ``cluster`` subcommands as ``hiceller``."""

import sys

from cluster.cli import main

sys.exit(main())
