"""The one seeded-batch iterator (critsample.seeded): sample i's noise comes from (seed, i) alone, whatever the batch
size and whichever command samples (generate, certify, evaluate, the race of bench/adaptive.py)."""

from __future__ import annotations

import pytest
import torch

import critsample
from critsample import certify, evaluate, plans
from critsample.sampling import sample_generator
from critsample.seeded import SeededBatch, sample_batch, sample_images, seeded_batches

STEPS = 3


@pytest.fixture(scope="module")
def digits():
    return critsample.load("dit-digits")


def test_batches_cover_the_samples_in_order_with_per_sample_generators():
    got = list(seeded_batches(7, 3, seed=5))
    assert [(b.lo, b.hi) for b in got] == [(0, 3), (3, 6), (6, 7)] and [len(b) for b in got] == [3, 3, 1]
    g = got[1].generators()
    assert [x.initial_seed() for x in g] == [sample_generator(5, i).initial_seed() for i in range(3, 6)]
    assert got[1].generators("fb")[0].initial_seed() not in {x.initial_seed() for x in g}  # a stream is another draw
    with pytest.raises(ValueError):
        list(seeded_batches(3, 0))


def test_batch_size_never_changes_the_noise_and_seeds_never_share_it(digits):
    plan = plans.full_guidance(digits, STEPS, 2.0)
    labels = torch.arange(6) % 10
    one = sample_images(digits, plan, labels, seed=0, batch_size=6, batch_invariant=True).images
    for bs in (1, 4):
        assert torch.equal(sample_images(digits, plan, labels, seed=0, batch_size=bs, batch_invariant=True).images, one)
    # seed + b arithmetic made seed 1's batch 0 equal to seed 0's batch 1: with (seed, i) they share no sample
    seed1 = sample_images(digits, plan, labels, seed=1, batch_size=3).images
    assert min((seed1[i] - one[j]).abs().max() for i in range(6) for j in range(6)) > 0.05


def test_generate_certify_evaluate_and_the_race_draw_the_same_samples(digits):
    plan = plans.full_guidance(digits, STEPS, 2.0)
    labels = torch.arange(5) % digits.num_classes
    ref = sample_images(digits, plan, labels, seed=3, batch_size=2).images
    assert torch.allclose(certify.paired_samples(digits, plan, 5, seed=3, batch_size=5)["images"], ref, atol=1e-5,
                          rtol=0)
    assert torch.allclose(evaluate.generate(digits, plan, labels, seed=3, batch_size=3, progress=False).images, ref,
                          atol=1e-5, rtol=0)
    race = torch.cat([sample_batch(digits, plan, labels[b.lo : b.hi], b) for b in seeded_batches(5, 2, 3)])
    assert torch.equal(race, ref)
    with pytest.raises(ValueError):
        sample_batch(digits, plan, labels[:2], SeededBatch(3, 0, 3))
