"""`python -m pretrain ...`: what the deepspeed launcher starts on every rank (`--module pretrain`)."""

import sys

from hiceller.cli import module_main
from pretrain.cli import add_pretrain_args
from pretrain.run import run_pretrain

sys.exit(module_main("pretrain", "Pretrain Celler (one process per rank).", add_pretrain_args, run_pretrain))
