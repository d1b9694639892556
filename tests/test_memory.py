"""Feature memory banks (monai_ssl.losses.memory)."""

import torch

from monai_ssl.losses.memory import ClassFeatureQueues


def test_class_queues_are_fifo_with_fixed_capacity_and_push_limit():
    q = ClassFeatureQueues(num_classes=2, capacity=4, max_push_fraction=1.0)
    rows = torch.arange(6.0)[:, None].repeat(1, 2)
    assert q.push(1, rows[:3]) == 3 and q.push(1, rows[3:]) == 3
    assert q.count(1) == 4 and q.count(0) == 0 and len(q) == 4
    assert q.features(1)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # the oldest two were overwritten
    assert q.features(0).shape == (0, 2)
    limited = ClassFeatureQueues(num_classes=1, capacity=8, max_push_fraction=0.25)
    assert limited.push(0, rows[:5]) == 2  # floor(0.25 * 8)
    kept = limited.features(0)[:, 0].tolist()
    assert len(kept) == 2 and kept == sorted(kept) and set(kept) <= set(range(5))
    assert limited.sample(0, 10).shape == (2, 2) and limited.sample(0, 1).shape == (1, 2)
