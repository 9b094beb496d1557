"""The ``digitmax`` task: deterministic per seed, disjoint sources, the larger digit as label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gator_hw.errors import GatorError
from gator_hw.train.data import DataSpec, load_data
from gator_hw.train.digitmax import DIGITMAX_CLASSES, make_digitmax


def _small(seed: int):
    return make_digitmax(32, seed, n_train=40, n_val=30)


def test_same_seed_same_canvases_other_seed_other():
    a_tr, a_va = _small(3)
    b_tr, b_va = _small(3)
    c_tr, _ = _small(4)
    for x, y in ((a_tr, b_tr), (a_va, b_va)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert np.array_equal(x.sources, y.sources)
    assert not torch.equal(a_tr.images, c_tr.images)


def test_train_and_val_sources_disjoint():
    tr, va = make_digitmax(32, 0, n_train=600, n_val=400)
    used_tr = set(tr.sources[tr.sources >= 0].tolist())
    used_va = set(va.sources[va.sources >= 0].tolist())
    assert used_tr and used_va and not used_tr & used_va
    assert len(used_tr) + len(used_va) > 1000  # both pools are drawn from, not a few digits


def test_label_is_the_larger_of_the_two_source_digits():
    from sklearn.datasets import load_digits

    target = load_digits().target
    tr, va = _small(1)
    for split in (tr, va):
        assert np.array_equal(split.labels.numpy(), np.maximum(target[split.sources[:, 0]],
                                                               target[split.sources[:, 1]]))
        assert split.images.shape[1:] == (1, 32, 32)
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0


def test_load_data_digitmax_size_classes_and_spec():
    data = load_data("digitmax", 64, seed=0)
    assert data.num_classes == DIGITMAX_CLASSES == 10
    assert len(data.val) >= 2000 and len(data.train) >= 10000
    x, y = data.train[0]
    assert x.shape == (3, 64, 64) and 0 <= y < 10
    assert set(data.val.labels.tolist()) == set(range(10))
    assert str(DataSpec.parse("digitmax")) == "digitmax"
    with pytest.raises(GatorError, match="takes no path"):
        DataSpec.parse("digitmax:/tmp")
