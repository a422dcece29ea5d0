import pytest
import torch

from pad_ray.config import ConfigError, RemovalStep, ScheduleConfig
from pad_ray.schedule import check_schedule, class_range, scheduled_indices

README_CIFAR10 = ScheduleConfig(
    init_ratio=0.75, add_end_epoch=20,
    remove=(RemovalStep(after_epoch=40, easiest_fraction=0.1), RemovalStep(after_epoch=60, easiest_fraction=0.2)),
)


@pytest.mark.parametrize(
    ("epoch", "count"),
    # Samples per class for CIFAR-10 under the authors' README buffer command (IR 0.75, AEE 20,
    # easiest 10 % removed after epoch 40 and 20 % after epoch 60).
    [(0, 3750), (5, 4062), (10, 4375), (15, 4687), (20, 5000), (21, 5000), (40, 5000),
     (41, 4500), (60, 4500), (61, 4000), (99, 4000)],
)
def test_cifar10_worked_table(epoch, count):
    order = [torch.arange(c * 5000, (c + 1) * 5000) for c in range(10)]
    subset = scheduled_indices(epoch, order, README_CIFAR10)
    assert len(subset) == 10 * count
    per_class = torch.bincount(subset // 5000, minlength=10)
    assert per_class.tolist() == [count] * 10


def test_adds_hard_samples_then_removes_easy_ones():
    order = [torch.tensor([7, 3, 9, 1])]  # easy -> hard
    early = ScheduleConfig(init_ratio=0.5, add_end_epoch=2,
                           remove=(RemovalStep(after_epoch=3, easiest_fraction=0.25),))
    assert scheduled_indices(0, order, early).tolist() == [7, 3]  # easiest half
    assert scheduled_indices(1, order, early).tolist() == [7, 3, 9]
    assert scheduled_indices(3, order, early).tolist() == [7, 3, 9, 1]
    assert scheduled_indices(4, order, early).tolist() == [3, 9, 1]  # easiest removed


def test_counts_come_from_each_class_not_a_constant():
    # CIFAR-100-like sizes and an uneven class (MNIST has unequal classes).
    order = [torch.arange(500), torch.arange(500, 1100)]
    assert class_range(0, 500, README_CIFAR10) == (0, 375)
    assert class_range(0, 600, README_CIFAR10) == (0, 450)
    assert class_range(70, 500, README_CIFAR10) == (100, 500)
    counts = torch.bincount((scheduled_indices(70, order, README_CIFAR10) >= 500).long()).tolist()
    assert counts == [400, 480]


def test_zero_add_end_epoch_uses_all_data_from_the_start():
    schedule = ScheduleConfig(init_ratio=0.5, add_end_epoch=0, remove=())
    assert class_range(0, 10, schedule) == (0, 10)


def test_a_schedule_that_empties_a_class_is_rejected():
    tiny = [torch.arange(3), torch.arange(3, 200)]
    schedule = ScheduleConfig(init_ratio=0.2, add_end_epoch=5, remove=())
    with pytest.raises(ConfigError, match="class 0 .* empty at expert epoch 0"):
        check_schedule(tiny, schedule, epochs=10)
    check_schedule([torch.arange(5)] * 2, schedule, epochs=10)
