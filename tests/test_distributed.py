"""Multi-process training (``multi_gpu_train.json``) on CPU with gloo: every trainable module stays identical.

Two processes train CCT-R for a few iterations on different data (the seed is offset by the rank); afterwards
every parameter of the students and of the loss terms (the contrastive projector included) and the students'
batch-norm statistics must be identical on both ranks, and only rank 0 writes TensorBoard files.
"""

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.test_bundle import CONFIGS, TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, overrides: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from monai.bundle import ConfigWorkflow

    files = [str(CONFIGS / n) for n in ("train.json", "methods/cctr.json", "multi_gpu_train.json")]
    wf = ConfigWorkflow(config_file=files, workflow_type=None, run_id="training", **overrides)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    state = {f"students.{k}": v for k, v in trainer.networks.state_dict().items()}
    state.update({f"terms.{k}": v for k, v in trainer.loss_terms.state_dict().items()})
    trainable = [n for n, p in trainer.networks.named_parameters() if p.requires_grad]
    trainable += [n for n, p in trainer.loss_terms.named_parameters() if p.requires_grad]
    torch.save(state, Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "trainable": len(trainable)}))
    wf.finalize()


def test_distributed_cctr_keeps_every_module_identical_on_both_ranks(tmp_path, tiny_registered):
    overrides = dict(
        TINY,
        dataset_dir=str(tiny_registered / "data"),
        registration_dir=str(tiny_registered / "reg"),
        output_root=str(tmp_path / "runs"),
        max_iterations=3,
        val_interval=2,
        progress=False,
    )
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    projector = [k for k in ranks[0] if k.startswith("terms.") and "projector" in k]
    assert projector, "the contrastive projector is a trainable loss-term module"
    students_bn = [k for k in ranks[0] if k.startswith("students.") and "running_mean" in k]
    for key in [*ranks[0].keys()]:
        if key.startswith("students.") or key in projector or "weight" in key or "bias" in key:
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert students_bn
    # the ranks did train on different data: the projector moved away from its (shared) initial value
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert info[0]["trainable"] == info[1]["trainable"] > 0
    events = [p.name for p in (tmp_path / "runs" / "cctr").glob("events.out.tfevents.*")]
    assert events and not any(f".{info[1]['pid']}." in name for name in events), events
    assert (tmp_path / "runs" / "cctr" / "models" / "checkpoint_iteration=2.pt").exists()
