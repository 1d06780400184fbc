"""`python -m pretrain ...`: what the deepspeed launcher starts on every rank (`--module pretrain`)."""

import sys

from pretrain.run import main

sys.exit(main())
