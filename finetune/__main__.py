"""`python -m finetune ...`: what the deepspeed launcher starts on every rank (`--module finetune`)."""

import sys

from finetune.cli import add_finetune_args
from finetune.run import run_finetune
from hiceller.cli import module_main

sys.exit(module_main("finetune", "Fine-tune Celler on a tissue (one process per rank).", add_finetune_args, run_finetune))
