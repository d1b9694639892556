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


def _prior_case():
    """A label, a network wrong on one 2x2 block (it calls it background) and a prior right there."""
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6] = 1
    label[0, 6:, :] = 2
    seen = label.clone()
    seen[0, 2:4, 2:4] = 0  # the network misses a quarter of class 1
    prior = torch.nn.functional.one_hot(label[0], 3).movedim(-1, 0).float()
    return label, seen, prior


def test_selection_chooses_the_prior_share_by_hand_computed_dice_and_records_it():
    label, seen, prior = _prior_case()
    ensemble = StudentEnsemble([Oracle(seen)])  # logits 4 on its class: softmax 0.9647 against 0.0177
    engine = _engine(label)
    engine.data_loader[0]["reg_prob"] = prior[None]
    StudentSelection(ensemble, SimpleInferer(), num_classes=3)(engine)
    # class 1 Dice without the prior: 2*12/(12+16) = 0.857, class 2: 1 -> mean 0.929; on the missed block the
    # prior wins once (1-w)*0.0177 + w > (1-w)*0.9647, i.e. w > 0.486: from w = 0.5 on, every class is exact
    assert engine.state.metrics["val_dice_student0"] == pytest.approx((24 / 28 + 1) / 2)
    assert engine.state.metrics["val_dice_student0_prior0.4"] == pytest.approx((24 / 28 + 1) / 2)
    assert engine.state.metrics["val_dice_student0_prior0.5"] == pytest.approx(1.0)
    assert ensemble.prior_weight.item() == pytest.approx(0.5)  # ties: the smallest share that scores 1
    fresh = StudentEnsemble([Oracle(seen)])
    fresh.load_state_dict(ensemble.state_dict())
    assert fresh.prior_weight.item() == pytest.approx(0.5)


def test_selection_without_priors_keeps_the_network_alone():
    label, seen, _ = _prior_case()
    ensemble = StudentEnsemble([Oracle(seen), Oracle(label)])
    engine = _engine(label)
    StudentSelection(ensemble, SimpleInferer(), num_classes=3)(engine)
    assert ensemble.prior_weight.item() == 0.0
    assert not [k for k in engine.state.metrics if "prior" in k]
    assert ensemble.member_weights.tolist() == [0.0, 1.0]


def test_old_checkpoints_load_without_a_prior_and_the_weight_is_checked():
    ens = StudentEnsemble([nn.Conv2d(1, 2, 1)])
    old = {k: v for k, v in ens.state_dict().items() if k != "prior_weight"}
    ens.set_prior_weight(0.3)
    ens.load_state_dict(old)
    assert ens.prior_weight.item() == 0.0
    with pytest.raises(ValueError, match="within"):
        ens.set_prior_weight(1.5)
