"""Seeded batches: the one way a plan, per-sample conditioning and a seed become images.

Sample i of a run seeded ``seed`` draws its initial noise from :func:`~critsample.sampling.sample_generator`
``(seed, i)`` alone (edm2's per-sample generators), so

* ``batch_size`` never changes which noise a sample gets (the network's floating-point rounding may still differ
  slightly between batch sizes; ``batch_invariant=True`` evaluates every sample alone and removes that too);
* different seeds never share noise (no ``seed + batch`` arithmetic: seed 1's sample 0 is not seed 0's sample B);
* plans sampled with the same seed are *paired*: sample i starts from the same noise under every plan.

The integrators (DDIM with eta 0, DPM-Solver++, flow Euler) draw no noise after the first step; a stochastic step
would draw from the same per-sample generators, which continue where the initial noise left them.

``certify.paired_samples``, ``evaluate.generate`` and ``bench/adaptive.py``'s race sample through
:func:`sample_batch` (:func:`sample_images` is the whole loop for callers that need nothing in between);
``generate.run`` (``critsample sample``) iterates the same :func:`seeded_batches` with the same generators,
:func:`one_at_a_time` and :func:`decode`, and runs the loop itself because it checkpoints a batch in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .denoisers import Cond, Denoiser
from .sampling import Plan, sample, sample_generators


@dataclass(frozen=True)
class SeededBatch:
    """Samples ``lo .. hi - 1`` of a run seeded ``seed``."""

    seed: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo

    def generators(self, stream: str = "") -> list[torch.Generator]:
        """One generator per sample, from (seed, index) alone (``stream``: an independent draw, see
        ``sample_generator``)."""
        return sample_generators(self.seed, self.lo, self.hi, stream)


def seeded_batches(num: int, batch_size: int, seed: int = 0) -> Iterator[SeededBatch]:
    """Samples 0 .. num - 1 in batches of at most ``batch_size``, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    for lo in range(0, num, batch_size):
        yield SeededBatch(int(seed), lo, min(num, lo + batch_size))


def one_at_a_time(model: Denoiser):
    """A ``predict`` for :func:`~critsample.sampling.sample` that runs each sample's rows in a forward of its own (a
    guided step: that sample's [cond; null] pair), so no sample's numbers depend on which others share its batch."""

    def predict(x: torch.Tensor, t: float, step, cond: Cond) -> torch.Tensor:
        guidance = step.guidance if step.mode == "guided" else None
        return torch.cat([model.predict(x[i : i + 1], t, cond[i : i + 1], radius=step.radius,
                                        guidance=guidance) for i in range(len(x))])

    return predict


def decode(model: Denoiser, x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1], on the CPU, of final states ``x`` (``batch_invariant``: one sample at a time)."""
    images = torch.cat([model.images(x[i : i + 1]) for i in range(len(x))]) if batch_invariant else model.images(x)
    return images.cpu()


@torch.no_grad()
def sample_batch(model: Denoiser, plan: Plan, cond: Cond, batch: SeededBatch, *,
                 batch_invariant: bool = False, stream: str = "") -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1], on the CPU, of the batch's samples under ``plan``; ``cond`` holds the batch's
    rows. ``batch_invariant``: the network and the decoder see one sample at a time (bitwise the same for any batch
    size); ``stream``: an independent draw of the initial noise (:meth:`SeededBatch.generators`)."""
    if len(cond) != len(batch):
        raise ValueError(f"Conditioning has {len(cond)} rows for a batch of {len(batch)} samples.")
    x = sample(model, plan, cond, generator=batch.generators(stream),
               predict=one_at_a_time(model) if batch_invariant else None)
    return decode(model, x, batch_invariant)


@dataclass
class Sampled:
    images: torch.Tensor  # (N, C, H, W) in [0, 1], cpu float32
    seconds: float  # wall time of sampling and decoding


def sample_images(
    model: Denoiser,
    plan: Plan,
    cond: Cond,
    seed: int = 0,
    batch_size: int = 256,
    *,
    batch_invariant: bool = False,
    on_batch: Callable[[SeededBatch], None] | None = None,
    stream: str = "",
) -> Sampled:
    """One image per row of ``cond`` (class ids with NULL rows, or prompt embeddings), sample i from (seed, i) (and
    ``stream``: an independent draw); ``on_batch(batch)`` runs after each batch (progress)."""
    device = next(model.parameters(), torch.empty(0)).device
    chunks, start = [], time.perf_counter()
    for b in seeded_batches(len(cond), batch_size, seed):
        chunks.append(sample_batch(model, plan, cond[b.lo : b.hi].to(device), b, batch_invariant=batch_invariant,
                                   stream=stream))
        if on_batch is not None:
            on_batch(b)
    return Sampled(torch.cat(chunks), time.perf_counter() - start)
