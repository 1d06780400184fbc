"""`python -m finetune ...`: what the deepspeed launcher starts on every rank (`--module finetune`)."""

import sys

from finetune.run import main

sys.exit(main())
