"""Cross-batch memory (Wang et al., CVPR 2020) with pytorch-metric-learning's semantics."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from . import tuples as _tuples
from .losses import PairwiseLoss
from .miners import MinedTuple, remove_self_pairs

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    """A ring buffer of the last `memory_size` embeddings (detached) and labels, used as the
    references of a pairwise loss, as PML's CrossBatchMemory: each call first enqueues the
    batch, then computes the loss of the batch's anchors against the whole memory, the pairs of
    an anchor with its own slot excluded; the memory gets no gradient. Only the filled part of
    the memory is used until it wraps around.

        xbm = CrossBatchMemory(structloss_fast.ContrastiveLoss(), embedding_size=128, memory_size=4096)
        loss = xbm(embeddings, labels)

    miner: mines (embeddings, labels, memory, memory labels) as PML's; the anchor's own slot is a
    candidate while mining and its pairs are removed afterwards. A structloss_fast miner fuses into
    its loss's pass (then nothing is listed); any other miner's tuple is listed.
    indices_tuple: added to the miner's (or all) pairs, as PML's.
    enqueue_mask (bool (B,)): only those rows are enqueued and the others are the anchors (PML's
    option for, e.g., MoCo-style key/query batches); self-pairs are then not excluded.
    loss: a structloss_fast pairwise loss, or any loss called as PML's
    (loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)), PML's own among them.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a pairwise loss module, got {type(loss).__name__}")
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be a miner (called as miner(embeddings, labels, ref_emb, ref_labels)), "
                            f"got {type(miner).__name__}")
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.reset_queue()

    def reset_queue(self) -> None:
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def _enqueue(self, embeddings: Tensor, labels: Tensor) -> int:
        start = self.queue_idx
        n = embeddings.shape[0]
        idx = (torch.arange(start, start + n, device=embeddings.device) % self.memory_size)
        self.embedding_memory[idx] = embeddings.detach().to(self.embedding_memory.dtype)
        self.label_memory[idx] = labels.detach().to(self.label_memory.dtype)
        self.queue_idx = (start + n) % self.memory_size
        if not self.has_been_filled and n > 0 and self.queue_idx <= start:
            self.has_been_filled = True
        return start

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None, enqueue_mask: Tensor | None = None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive (as in pytorch-metric-learning)")
        _validate.tensor("embeddings", embeddings, ndim=2, floating=True)
        _validate.tensor("labels", labels, ndim=1, integer=True)
        _validate.length("labels", labels, embeddings.shape[0], "embeddings")
        _validate.same_device(embeddings=embeddings, labels=labels, enqueue_mask=enqueue_mask)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} columns, "
                             f"got shape {tuple(embeddings.shape)}")
        device, dtype = embeddings.device, embeddings.dtype
        if self.embedding_memory.device != device or self.embedding_memory.dtype != dtype:
            self.embedding_memory = self.embedding_memory.to(device=device, dtype=dtype)
            self.label_memory = self.label_memory.to(device=device)
        if enqueue_mask is not None:
            _validate.tensor("enqueue_mask", enqueue_mask, ndim=1)
            _validate.length("enqueue_mask", enqueue_mask, embeddings.shape[0], "embeddings")
            if enqueue_mask.dtype != torch.bool:
                raise TypeError(f"enqueue_mask must be a bool tensor, got dtype {enqueue_mask.dtype}")
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        else:
            queued, queued_labels = embeddings, labels
        if queued.shape[0] > self.memory_size:
            raise ValueError(f"a batch of {queued.shape[0]} rows does not fit in memory_size={self.memory_size}")
        start = self._enqueue(queued, queued_labels)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        self_index = start if (enqueue_mask is None and filled > 0) else None
        ours = isinstance(self.loss, PairwiseLoss)
        if ours and self.miner is None and indices_tuple is None:
            return self.loss(embeddings, labels, ref_emb=memory, ref_labels=memory_labels, ref_self_index=self_index)
        mined = self._mine(embeddings, labels, memory, memory_labels, self_index)
        if ours and indices_tuple is None and isinstance(mined, MinedTuple):
            # The loss fuses our miner's rule (the engine removes the self pairs), or lists its tuple.
            return self.loss(embeddings, labels, mined, memory, memory_labels, ref_self_index=self_index)
        mined = tuple(mined)
        if indices_tuple is not None:
            given = tuple(indices_tuple)
            if len(given) == 3 and len(mined) == 4:
                given = _tuples.to_pairs(given)
            elif len(given) == 4 and len(mined) == 3:
                given = _tuples.to_triplets(given)
            mined = tuple(torch.cat([m, g.to(m.device)]) for m, g in zip(mined, given))
        return self.loss(embeddings, labels, mined, memory, memory_labels)

    def _mine(self, embeddings, labels, memory, memory_labels, self_index):
        """The miner's tuple (or all pairs) without the anchors' self pairs."""
        M = memory.shape[0]
        if self.miner is None:
            t = _tuples.all_pairs(labels, memory_labels, None, M)
        else:
            t = self.miner(embeddings, labels, memory, memory_labels)
            if isinstance(t, MinedTuple):
                return t if self_index is None else t.without_self(self_index)
        return t if self_index is None else remove_self_pairs(tuple(t), self_index, M)

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, queue_idx={self.queue_idx}"
