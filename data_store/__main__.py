"""`python -m data_store ingest|synth|info ...`."""

import sys

from hiceller.cli import main

sys.exit(main(sys.argv[1:]))
