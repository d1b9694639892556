"""Per-student validation: candidate mixes, the selection recorded in the ensemble's state dict and used."""

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.inferers import SimpleInferer

from monai_ssl.engines.selection import StudentSelection, candidate_weights
from monai_ssl.networks.ensemble import StudentEnsemble


class Oracle(nn.Module):
    """Logits that are the one-hot of a fixed map, optionally with some pixels wrong."""

    def __init__(self, target: torch.Tensor, wrong: int = 0):
        super().__init__()
        self.target, self.wrong = target, wrong
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        t = self.target.clone()
        t.view(-1)[: self.wrong] = (t.view(-1)[: self.wrong] + 1) % 3
        return torch.nn.functional.one_hot(t, 3).movedim(-1, 1).float() * 4 + self.bias


def _engine(label):
    engine = Engine(lambda e, b: None)
    engine.data_loader = [{"image": torch.zeros(1, 1, 8, 8), "label": label[None]}]
    engine.state.device = "cpu"
    return engine


def test_candidate_weights_hand_values():
    assert candidate_weights(1) == [(1.0,)]
    assert candidate_weights(2) == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    assert candidate_weights(3)[-1] == pytest.approx((1 / 3, 1 / 3, 1 / 3))


@pytest.mark.parametrize("good", [0, 1])
def test_selection_picks_the_better_student_and_records_it(good):
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6] = 1
    label[0, 6:, :] = 2
    nets = [Oracle(label, wrong=0 if k == good else 40) for k in range(2)]
    ensemble = StudentEnsemble(nets)
    assert ensemble.member_weights.tolist() == [0.5, 0.5]  # plain mean until validated
    selection = StudentSelection(ensemble, SimpleInferer(), num_classes=3)
    engine = _engine(label)
    selection(engine)
    expected = [1.0, 0.0] if good == 0 else [0.0, 1.0]
    assert ensemble.member_weights.tolist() == expected
    assert engine.state.metrics[f"val_dice_student{good}"] == pytest.approx(1.0)
    assert engine.state.metrics[f"val_dice_student{1 - good}"] < 0.9
    # recorded with the model: a fresh ensemble loading the state dict uses the same students only
    fresh = StudentEnsemble([Oracle(label), Oracle(label, 40)])
    fresh.load_state_dict(ensemble.state_dict())
    assert fresh.member_weights.tolist() == expected
    out = fresh(torch.zeros(1, 1, 8, 8))
    assert [n.calls for n in fresh.networks] == ([1, 0] if good == 0 else [0, 1])  # weight 0: never run
    assert torch.equal(out.argmax(1), fresh.networks[good](None).argmax(1))


def test_weighted_mix_is_the_weighted_mean_of_logits_and_old_checkpoints_load_as_the_mean():
    a, b = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)
    ens = StudentEnsemble([a, b])
    x = torch.randn(2, 1, 4, 4)
    ens.set_member_weights([3, 1])
    assert torch.allclose(ens(x), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        ens.set_member_weights([1, -1])
    old = {k: v for k, v in ens.state_dict().items() if k != "member_weights"}
    again = StudentEnsemble([nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)])
    again.load_state_dict(old)
    assert again.member_weights.tolist() == [0.5, 0.5]
    assert torch.allclose(again(x), 0.5 * (a(x) + b(x)), atol=1e-6)
