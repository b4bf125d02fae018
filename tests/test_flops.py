"""FLOPs per step: counted by Lightning's measure_flops on a meta-device copy of the model, written into meta.json
at the first batch, and compared with hand formulas."""

from __future__ import annotations

import json
import types

import pytest
import torch

from noble_cli import recipes
from noble_cli.tasks import get_task
from noble_cli.train.flops import FlopsProbe, micro_batch_flops
from noble_cli.train.run_folder import RunFolder

B, T = 8, 64


def module(**overrides):
    cfg = recipes.resolve("llm-tiny", overrides)
    return get_task(cfg.task).build_module(cfg)


def batch():
    x = torch.randint(0, 100, (B, T))
    return x, x


def test_the_branch_costs_what_its_matmuls_cost():
    base, _ = micro_batch_flops(module(), batch())
    cos, items = micro_batch_flops(module(**{"noble.branch": "cosnet"}), batch())
    init, _ = micro_batch_flops(module(**{"noble.init_only": True}), batch())
    assert items == B * T
    # llm-tiny: 2 blocks of q, k, v, o (64 -> 64), fc (64 -> 256), fc2 (256 -> 64); CosNet r = 8 adds per layer
    # x W_down (in*r), the r x r mix and W_up (r*out): forward 2 FLOPs per multiply-add, backward twice that.
    # q, k, v, o: 512 + 64 + 512 = 1088 each; fc: 512 + 64 + 2048 = 2624; fc2: 2048 + 64 + 512 = 2624
    # per block 4 * 1088 + 2 * 2624 = 9600, 2 blocks 19200; x 6 x 512 tokens = 58,982,400
    assert cos - base == 58_982_400
    assert init == base  # the init-only control computes exactly what the baseline does
    # the baseline is dominated by the 64 -> 50304 head: 6 * 512 * 64 * 50304 = 9,889,579,008 of it
    assert 9_889_579_008 < base < 1.1 * 9_889_579_008


def test_a_loss_that_cannot_run_on_the_meta_device_gives_none_not_an_error():
    m = module()

    def loss(self, batch):
        raise RuntimeError("data-dependent shape")

    m.__class__ = type("Broken", (type(m),), {"loss": loss})  # the probe runs the class's loss
    assert micro_batch_flops(m, batch()) == (None, B * T)


def test_the_probe_writes_flops_into_meta_once(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.meta_path.write_text(json.dumps({"run_id": "x"}))
    trainer = types.SimpleNamespace(is_global_zero=True, accumulate_grad_batches=2, world_size=3)
    m = module(**{"noble.branch": "cosnet"})
    probe = FlopsProbe(folder)
    probe.on_train_batch_start(trainer, m, batch(), 0)
    meta = json.loads(folder.meta_path.read_text())
    per_micro, _ = micro_batch_flops(m, batch())
    assert meta["flops_per_step"] == per_micro * 2 * 3  # accumulation x devices
    assert meta["flops_per_item"] == pytest.approx(per_micro / (B * T)) and meta["flops_item"] == "tokens"
    assert meta["run_id"] == "x"  # the rest of meta.json stays
    folder.meta_path.write_text(json.dumps({"run_id": "x", "flops_per_step": 1}))
    probe.on_train_batch_start(trainer, m, batch(), 1)  # only the first batch, and never over a recorded value
    FlopsProbe(folder).on_train_batch_start(trainer, m, batch(), 0)
    assert json.loads(folder.meta_path.read_text())["flops_per_step"] == 1
