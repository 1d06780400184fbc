"""Memory/speed transformations applied to a built :class:`CellerModel` from the outside.

The model file stays a plain module; what the training loop wants on top of it (activation
checkpointing, ``torch.compile``) is applied here, the way torchtitan separates ``model.py`` and
``parallelize.py``.
"""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from pretrain.model import CellerModel

__all__ = ["apply_activation_checkpointing", "is_activation_checkpointed", "apply_compile", "is_compiled"]


def is_activation_checkpointed(model: CellerModel) -> bool:
    """True when every encoder block of ``model`` is wrapped for activation checkpointing."""
    return all(isinstance(block, CheckpointWrapper) for block in model.blocks)


def apply_activation_checkpointing(model: CellerModel) -> CellerModel:
    """Recompute each encoder block in the backward pass instead of storing its activations.

    Each block is wrapped with ``torch.utils.checkpoint`` (``use_reentrant=False``: works with
    inputs that need no grad, keyword arguments and ``torch.autograd.grad``). The wrapper's
    state-dict hooks strip its own prefix, so state-dict keys and checkpoints are unchanged
    (``named_parameters()`` does show the ``_checkpoint_wrapped_module.`` infix; match parameter
    names by suffix, e.g. for weight-decay groups). ``forward_padded`` reaches the inner block
    through the wrapper's attribute fallback and is not checkpointed (it is for evaluation).
    Memory then holds one block input per layer (``[T, d]``) instead of all intermediate
    activations (the ``[T, d_ff]`` FFN activations and attention outputs dominate).

    Modifies ``model`` in place and returns it. Raises ``ValueError`` if already applied, because
    wrapping twice would recompute every block twice.
    """
    if any(isinstance(block, CheckpointWrapper) for block in model.blocks):
        raise ValueError("activation checkpointing is already applied to this model")
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def is_compiled(model: CellerModel) -> bool:
    """True when every encoder block of ``model`` has been compiled by :func:`apply_compile`."""
    return all(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)


def apply_compile(model: CellerModel) -> CellerModel:
    """``torch.compile`` each encoder block in place (torchtitan compiles per block, too).

    Per block rather than the whole task: the loss and the metrics read values on the host, which
    would break one big graph, and the 12 identical blocks share one compiled graph. In place
    (``Module.compile``) rather than ``torch.compile(block)``: the wrapper that returns would add
    ``_orig_mod.`` to every state-dict key and make checkpoints differ by switch. ``dynamic=True``:
    every batch has another token count and longest cell, which would otherwise recompile once
    before torch marks them dynamic. Apply after activation checkpointing (the wrapper is compiled
    with the block). The SDPA backend reads cell lengths on the host and so splits each block's
    graph; the flash kernels (flash, torch_varlen) do not.

    Modifies ``model`` in place and returns it. Raises ``ValueError`` if already applied.
    """
    if any(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks):
        raise ValueError("torch.compile is already applied to this model's blocks")
    for block in model.blocks:
        block.compile(dynamic=True)
    return model
