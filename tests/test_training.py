"""Training workflow (configs/train.json, multi_gpu_train.json) on tiny synthetic data."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import BUNDLE, run_workflow

from scripts.checkpoint import load_weights
from scripts.data.lists import training_images
from scripts.synthetic.lumir import make_dataset
from scripts.network import EOIR, MultiScaleOutputs
from scripts.data.pair_dataset import RandomPairDataset
from scripts.training import PairLoss, latest_checkpoint

SHAPE = (32, 48, 48)


@pytest.fixture(scope="module")
def tiny_lumir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumir")
    make_dataset(root, subjects=4, seed=3, shape=SHAPE, val_subjects=2)
    return root


def _train(data, out, **overrides):
    kw = {"dataset_dir": str(data), "data_list_file_path": str(data / "LUMIR_dataset.json"), "output_dir": str(out),
          "network_def#start_channel": 8, "num_workers": 0, "learning_rate": 2e-3, "log_every": 1}
    kw.update(overrides)
    return run_workflow("train.json", workflow_type="train", **kw)


def _mean_loss(weights, data, pairs):
    """Mean multi-scale loss of fixed (moving, fixed) pairs with the given weights."""
    import nibabel as nib

    base = EOIR(start_channel=8)
    if weights is not None:
        load_weights(base, weights)
    net = MultiScaleOutputs(base).train()
    loss = PairLoss()
    images = training_images(data / "LUMIR_dataset.json", data)
    vals = []
    with torch.no_grad():
        for i, j in pairs:
            x = np.stack([nib.load(images[i]).get_fdata(), nib.load(images[j]).get_fdata()]) / 255.0
            x = torch.tensor(x[None], dtype=torch.float32)
            vals.append(float(loss(net(x), x)))
    return float(np.mean(vals))


def test_training_lowers_the_loss_logs_dice_and_resumes(tiny_lumir, tmp_path):
    out = tmp_path / "run"
    _train(tiny_lumir, out, max_epochs=2)
    assert latest_checkpoint(str(out)).endswith("checkpoint_epoch=2.pt")
    assert (out / "model.pt").is_file()  # best validation Dice, plain state dict

    # the trained weights lower the loss on training pairs, compared with the initial weights
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save(EOIR(start_channel=8).state_dict(), init)
    pairs = [(0, 1), (1, 2), (2, 3), (3, 0)]
    before, after = _mean_loss(init, tiny_lumir, pairs), _mean_loss(out / "checkpoint_epoch=2.pt", tiny_lumir, pairs)
    assert after < before - 0.01, (before, after)

    # validation Dice and folding went to TensorBoard every epoch, with image snapshots
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    tags = events.Tags()
    assert {"val_dice", "val_folding_pct", "train/loss", "train/ncc_l0", "train/reg_l4", "train/lr"} <= set(tags["scalars"])
    dice = [e.value for e in events.Scalars("val_dice")]
    assert len(dice) == 2 and all(0.2 < d <= 1.0 for d in dice)
    assert "val/snapshot" in tags["images"]

    # the same command again with more epochs resumes at epoch 3 (model, optimizer, scheduler, epoch)
    ckpt = torch.load(out / "checkpoint_epoch=2.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2 * 4  # ignite keeps the iteration; epoch = iteration // epoch_length
    wf = _train(tiny_lumir, out, max_epochs=3)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3 and trainer.state.iteration == 3 * 4
    assert latest_checkpoint(str(out)).endswith("checkpoint_epoch=3.pt")
    lr = wf.parser.get_parsed_content("optimizer").param_groups[0]["lr"]
    assert lr == pytest.approx(2e-3 * (1 - 3 / 3) ** 0.9, abs=1e-12)


def test_activation_checkpointing_trains_the_same_weights(tiny_lumir, tmp_path):
    """``--activation_checkpointing true`` (for full-size training on a small GPU) changes memory,
    not the training: one epoch from the same seed ends at the same weights."""
    states = []
    for flag in (False, True):
        wf = _train(tiny_lumir, tmp_path / str(flag), max_epochs=1, activation_checkpointing=flag, val_interval=2)
        assert wf.parser.get_parsed_content("train_network").activation_checkpointing is flag
        states.append(torch.load(tmp_path / str(flag) / "checkpoint_epoch=1.pt", weights_only=False)["model"])
    assert states[0].keys() == states[1].keys()
    torch.manual_seed(0)
    init = EOIR(start_channel=8).state_dict()
    for k in states[0]:
        if re.fullmatch(r"encoder\.\d\.conv\.bias", k):
            # a bias right before InstanceNorm has a zero gradient: only float noise, which Adam
            # scales up to full steps of either sign, differently in two runs of any kind
            continue
        moved = float((states[0][k] - init[k]).abs().max())
        differ = float((states[1][k] - states[0][k]).abs().max())
        # Adam turns gradient rounding differences (1e-7 relative) into slightly different steps
        # on small gradients: measured under 0.5 % of how far the weights moved in the epoch
        assert differ <= 0.02 * moved + 1e-7, (k, differ, moved)
    moved = max(float((states[0][k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3  # the epoch did train


def test_random_pairs_are_reproducible_and_redrawn_each_epoch(tiny_lumir):
    images = training_images(tiny_lumir / "LUMIR_dataset.json", tiny_lumir)
    ds = RandomPairDataset(images, seed=5)
    draws = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        draws.append([ds.fixed_index(i) for i in range(len(images))])
    assert all(f != i for d in draws for i, f in enumerate(d))
    assert len({tuple(d) for d in draws}) > 1  # a new draw each epoch
    again = RandomPairDataset(images, seed=5)
    again.set_epoch(2)
    assert [again.fixed_index(i) for i in range(len(images))] == draws[1]
    assert ds[0]["moving"] == images[0]


def test_multi_gpu_config_runs_two_processes_on_cpu(tiny_lumir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "monai.bundle", "run", "training",
           "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
           "--dataset_dir", str(tiny_lumir), "--output_dir", str(out), "--max_epochs", "1",
           "--network_def#start_channel", "4", "--num_workers", "0", "--log_every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # 4 training images over 2 ranks: 2 iterations per rank per epoch
    assert re.search(r"epoch 1/1 iter 2/2", res.stdout + res.stderr)
    assert (out / "checkpoint_epoch=1.pt").is_file() and (out / "model.pt").is_file()
    assert not any(p.name.startswith("rank") for p in out.iterdir())


def test_gradient_clipping_handler_bounds_the_gradient_norm():
    from monai.engines import SupervisedTrainer

    from scripts.training import GradientClipping

    net = torch.nn.Linear(4, 1)
    norms = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, network=net,
        train_data_loader=[{"image": torch.randn(8, 4) * 100, "label": torch.zeros(8, 1)}],
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=torch.nn.MSELoss(), decollate=False,
    )
    GradientClipping(max_norm=0.5).attach(trainer)
    from monai.engines.utils import IterationEvents

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda e: norms.append(float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())))
    trainer.run()
    assert norms and norms[0] == pytest.approx(0.5, rel=1e-4)  # the raw norm is in the thousands


def test_train_step_benchmark_cli_small():
    """``python -m scripts.tools.benchmark_train_step`` measures both settings, on the same first loss."""
    res = subprocess.run(
        [sys.executable, "-m", "scripts.tools.benchmark_train_step", "--shape", "32,48,32", "--start_channel", "4",
         "--threads", "1", "--steps", "1", "--warmup", "0"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    off, on = report["runs"]["checkpointing=off,amp=off"], report["runs"]["checkpointing=on,amp=off"]
    for r in (off, on):
        assert r["seconds"] > 0 and r["peak_rss_gb"] > r["baseline_rss_gb"] > 0
    assert on["first_loss"] == pytest.approx(off["first_loss"], rel=1e-6)
