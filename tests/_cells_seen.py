"""`python tests/_cells_seen.py PRETRAIN_ARGS...`: `python -m pretrain` that also records the cells it
trains on, one line per micro batch into ``$HICELLER_SEEN_DIR/rank{RANK}.txt``: ``step epoch joinid...``.

Only the record is added: the loop, loader, store and DeepSpeed are the real ones. With no loader
workers and no lookahead (CPU), a batch is read when it is trained, so the lines are exactly the
micro batches of the steps trained.
"""

import os
import sys

from pretrain.feed import MicroBatchFeed

_prepare = MicroBatchFeed._prepare


def _recording_prepare(self, key):
    batch, args = _prepare(self, key)
    stream = self.streams[key[1] % len(self.streams)]
    path = os.path.join(os.environ["HICELLER_SEEN_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
    with open(path, "a") as f:
        f.write(" ".join(map(str, [key[0] + 1, stream.epoch, *batch.joinids.tolist()])) + "\n")
    return batch, args


MicroBatchFeed._prepare = _recording_prepare

if __name__ == "__main__":
    from hiceller.cli import module_main
    from pretrain.cli import add_pretrain_args
    from pretrain.run import run_pretrain

    sys.exit(module_main("pretrain", "Pretrain Celler, recording the cells seen.", add_pretrain_args, run_pretrain))
