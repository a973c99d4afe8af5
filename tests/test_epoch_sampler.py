"""The epoch sampler: OneTrainer's REPEATS/SAMPLES counts, walking, seeded shuffles, ranks, resume."""

from collections import Counter

import pytest

from likeness.trainer.epoch_sampler import (
    ConceptItems, EpochSampler, Position, batches_per_epoch, epoch_samples, steps_per_epoch,
)

PERSON = [f"person/{i:03d}.png" for i in range(36)]
REGULARIZATION = [f"reg/{i:04d}.jpg" for i in range(5000)]


def reference_concepts() -> list[ConceptItems]:
    return [ConceptItems("person", PERSON, 1.0), ConceptItems("reg", REGULARIZATION[::-1], 0.0072)]


def test_reference_run_gives_72_samples_36_of_each():
    concepts = reference_concepts()
    assert steps_per_epoch(concepts, batch_size=1) == 72
    sampler = EpochSampler(concepts, batch_size=1, seed=42)
    batches = list(sampler)
    assert len(batches) == 72 and all(len(b) == 1 for b in batches)
    counts = Counter(s.concept for b in batches for s in b)
    assert counts == {"person": 36, "reg": 36}
    assert sorted(s.item for b in batches for s in b if s.concept == "person") == PERSON


def test_fractional_concept_walks_its_sorted_list_across_epochs():
    reg = reference_concepts()[1]
    assert reg.epoch_items(0) == REGULARIZATION[:36]  # sorted, though given reversed
    assert reg.epoch_items(1) == REGULARIZATION[36:72]
    seen = set()
    epochs = -(-5000 // 36)  # 139 epochs cover 5000 images
    for epoch in range(epochs):
        seen.update(reg.epoch_items(epoch))
    assert seen == set(REGULARIZATION)
    assert reg.epoch_items(138)[-1] == REGULARIZATION[(138 * 36 + 35) % 5000]  # wraps around


def test_below_one_sample_contributes_nothing_and_repeats_above_one():
    assert ConceptItems("tiny", ["a", "b"], 0.4).samples_per_epoch == 0
    doubled = ConceptItems("twice", ["b", "a", "c"], 2.0)
    assert doubled.samples_per_epoch == 6
    assert Counter(doubled.epoch_items(0)) == {"a": 2, "b": 2, "c": 2}


def test_samples_strategy_takes_int_balancing():
    concept = ConceptItems("reg", REGULARIZATION, 50.9, strategy="SAMPLES")
    assert concept.samples_per_epoch == 50
    assert concept.epoch_items(2) == REGULARIZATION[100:150]


def test_same_seed_same_order_other_epoch_or_seed_other_order():
    concepts = reference_concepts()
    epoch0 = EpochSampler(concepts, 1, seed=42).batches(0)
    assert EpochSampler(concepts, 1, seed=42).batches(0) == epoch0
    person_order = lambda batches: [s.item for b in batches for s in b if s.concept == "person"]  # noqa: E731
    assert person_order(EpochSampler(concepts, 1, seed=42).batches(1)) != person_order(epoch0)
    assert person_order(EpochSampler(concepts, 1, seed=7).batches(0)) != person_order(epoch0)


def test_validation_and_disabled_concepts_are_excluded():
    concepts = [
        ConceptItems("person", PERSON, 1.0),
        ConceptItems("held-out", ["v1", "v2"], 1.0, validation=True),
        ConceptItems("off", ["x1", "x2"], 1.0, enabled=False),
    ]
    samples = epoch_samples(concepts, 0, seed=1)
    assert {s.concept for s in samples} == {"person"} and len(samples) == 36


def test_leftovers_that_do_not_fill_a_batch_are_dropped():
    concepts = [ConceptItems("a", [str(i) for i in range(10)], 1.0)]
    sampler = EpochSampler(concepts, batch_size=4, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4]
    assert len({s.item for b in batches for s in b}) == 8
    assert batches_per_epoch(concepts, 4, gradient_accumulation_steps=3) == 0


def test_two_processes_get_equal_disjoint_batches():
    concepts = [ConceptItems("a", [str(i) for i in range(23)], 1.0)]
    ranks = [EpochSampler(concepts, batch_size=2, seed=3, world_size=2, rank=r) for r in (0, 1)]
    batches = [r.batches(0) for r in ranks]
    assert len(batches[0]) == len(batches[1]) == 5 == steps_per_epoch(concepts, 2, world_size=2)
    items = [s.item for per_rank in batches for b in per_rank for s in b]
    assert len(items) == len(set(items)) == 20


def test_position_resumes_where_it_stopped():
    concepts = [ConceptItems("a", [str(i) for i in range(6)], 1.0)]
    full = EpochSampler(concepts, batch_size=1, seed=5)
    expected = list(full) + list(full)  # two epochs
    assert full.position == Position(2, 0)

    first = EpochSampler(concepts, batch_size=1, seed=5)
    taken = [batch for _, batch in zip(range(4), first)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 4}
    resumed = EpochSampler(concepts, batch_size=1, seed=5)
    resumed.load_state_dict(state)
    assert taken + list(resumed) + list(resumed) == expected


def test_clear_errors():
    with pytest.raises(ValueError, match="concept 'reg': balancing"):
        ConceptItems("reg", ["a"], "auto")
    with pytest.raises(ValueError, match="training.batch_size"):
        EpochSampler([ConceptItems("a", ["1", "2"], 1.0)], batch_size=4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler([ConceptItems("a", ["1", "2"], 1.0)], batch_size=1, seed=0, world_size=2, rank=2)
