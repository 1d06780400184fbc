"""HiCeller: pretrain Celler single-cell foundation models and turn them into cell-type annotators."""

__version__ = "0.1.0"
