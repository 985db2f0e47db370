"""Streaming lanes: the data order of sae.stream that does not depend on the process count.

Token rows (global ids 0, 1, 2, ... in the seeded document order) are dealt round-robin to
`n_lanes` lanes: row i goes to lane i % n_lanes. Each lane shuffles its vectors in its own
buffer (`shuffled_batches`, seeded by (seed, lane)) and gives `batch_size / n_lanes`
vectors to every global batch, lanes in order. Under torchrun, rank r of W forwards only
the rows i with i % W == r, which are exactly the rows of its lanes l % W == r (W divides
n_lanes), so every process produces its own activations, and the global batches (hence
the DDP-averaged gradients) are those of a single process with the same lanes.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from ..core.config import SAECfg
from ..core.errors import SaelabError


def resolve_lanes(cfg: SAECfg, world: int) -> int:
    """sae.stream_lanes with 0 resolved (one lane per process), checked against the world
    size, the batch size and the shuffle buffer."""
    lanes = cfg.stream_lanes or world
    if lanes % world:
        raise SaelabError(f"sae.stream_lanes = {lanes} does not split over {world} processes; "
                          f"set it to a multiple of {world}")
    if cfg.batch_size % lanes:
        raise SaelabError(f"sae.batch_size = {cfg.batch_size} does not split over "
                          f"sae.stream_lanes = {lanes}; pick a multiple of {lanes}")
    if cfg.shuffle_buffer // lanes < cfg.batch_size // lanes:
        raise SaelabError(f"sae.shuffle_buffer = {cfg.shuffle_buffer} is smaller than one batch "
                          f"({cfg.batch_size}); raise it (>= 1M is advised)")
    return lanes


def lane_batches(batches: Iterable, *, rank: int, world: int, n_lanes: int, capacity: int,
                 batch_size: int, seed: int, scale: float) -> Iterator[torch.Tensor]:
    """This rank's share of every global batch: batch_size vectors from each of its lanes.

    `batches` are `ActivationBatch`es of this rank's rows (local row j is global row
    rank + j * world); `capacity` and `batch_size` are per lane. Yields the concatenation
    of the rank's lanes' batches, in lane order; ends when a lane runs dry.
    """
    from .train import shuffled_batches

    lanes = [lane for lane in range(n_lanes) if lane % world == rank]
    queues: dict[int, deque] = {lane: deque() for lane in lanes}
    source = iter(batches)

    def route() -> bool:
        b = next(source, None)
        if b is None:
            return False
        lane_of = torch.from_numpy((rank + b.index[:, 0] * world) % n_lanes).to(b.acts.device)
        for lane in lanes:
            sel = (lane_of == lane).nonzero().squeeze(1)
            if len(sel):
                queues[lane].append(b.acts.index_select(0, sel))
        return True

    def chunks(lane: int) -> Iterator[torch.Tensor]:
        while True:
            while not queues[lane]:
                if not route():
                    return
            yield queues[lane].popleft()

    # One lane keeps the plain stream's seed: a single process with one lane shuffles as
    # before lanes existed (and as the store's epoch 0 when the buffer holds everything).
    streams = [shuffled_batches(chunks(lane), capacity=capacity, batch_size=batch_size,
                                seed=seed if n_lanes == 1 else (seed, lane),
                                scale=scale) for lane in lanes]
    for parts in zip(*streams):
        yield parts[0] if len(parts) == 1 else torch.cat(parts)
