"""optim.name=muon: which parameters each optimizer takes (read from what one step does to them), the schedule of
both, identities and labels, and an exact resume after kill -9."""

import re
import sys
from pathlib import Path

import pytest
import torch

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.errors import NobleError
from noble_cli.tasks import get_task
from noble_cli.tasks.optimizers import MuonWithAdamW

SMALL = ["model.d_model=32", "model.n_head=2", "model.n_layer=2", "model.block_size=32", "data.seq_len=32",
         "noble.rank=4", "optim.weight_decay=0", "optim.lr=1e-3", "optim.muon_lr=2e-3", "schedule.warmup_steps=0",
         "noble.up_init_scale=1.0"]  # W_up far from 0: W_down gets gradients well above AdamW's eps
MAIN = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.fc.weight", "mlp.fc2.weight")


def stepped(*sets: str):
    """A small byte-level GPT with CosNet after one optimizer step on random data: (module, the parameters before)."""
    return one_step(recipes.resolve("llm-bytes", sets=[*SMALL, "noble.branch=cosnet", *sets]))


def one_step(cfg):
    """The run's module after one optimizer step on random bytes: (module, the parameters before, optimizer)."""
    torch.manual_seed(0)
    module = get_task(cfg.task).build_module(cfg)
    opt, _ = module.optimizer_and_schedule()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    x = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(0))
    module.loss((x[:, :-1].contiguous(), x[:, 1:].contiguous()))[0].backward()
    opt.step()
    return module, before, opt


def update(module, before, name) -> torch.Tensor:
    return module.model.get_parameter(name).detach() - before[name]


def is_muon_update(delta: torch.Tensor, lr: float) -> bool:
    """Muon's first step is lr x sqrt(max(1, out/in)) x the gradient orthogonalized by Newton-Schulz: a spectral norm
    of about lr x sqrt(max(1, out/in)). AdamW's first step at a lr half as large, lr/2 x sign(g), has a spectral norm
    of at least lr/2 x sqrt(min(out, in)), 2.8 times that or more at width 32."""
    out, inn = delta.shape
    top = torch.linalg.matrix_norm(delta, ord=2) / (lr * max(1.0, out / inn) ** 0.5)
    return bool(0.7 < top < 1.3)


def is_adam_update(delta: torch.Tensor, lr: float) -> bool:
    """AdamW's first step (no decay) moves each entry by lr x g / (|g| + eps): by lr, but for the few gradients
    near eps."""
    moved = delta[delta != 0].abs()
    at_lr = torch.isclose(moved, torch.full_like(moved, lr), rtol=5e-2)
    return moved.numel() > 0 and bool(at_lr.float().mean() > 0.8) and bool(moved.max() < lr * 1.01)


def test_muon_takes_the_blocks_main_weights_and_adamw_the_rest_with_noble_multipliers():
    module, before, opt = stepped("optim.name=muon")
    assert isinstance(opt, MuonWithAdamW)
    on_muon = {n for n, p in module.model.named_parameters() if any(p is q for q in opt.muon.param_groups[0]["params"])}
    assert on_muon == {f"blocks.{i}.{m}" for i in range(2) for m in MAIN}
    for name in on_muon:
        assert is_muon_update(update(module, before, name), 2e-3), name
    assert is_adam_update(update(module, before, "wte.weight"), 1e-3)  # embedding (tied head): AdamW at lr
    ratio = min(32, 32) / 4  # q: 32 -> 32 at rank 4
    assert is_adam_update(update(module, before, "blocks.0.attn.q.up.weight"), 1e-3 * ratio**0.4)  # W_up's mult
    assert is_adam_update(update(module, before, "blocks.0.attn.q.down.weight"), 1e-3)
    assert is_adam_update(update(module, before, "blocks.0.attn.q.act.mix.weight"), 1e-3 * ratio**0.5)


def test_branch_optimizer_muon_moves_the_branch_matrices_without_multipliers():
    module, before, opt = stepped("optim.name=muon", "optim.branch_optimizer=muon")
    for part in ("down.weight", "up.weight", "act.mix.weight"):
        assert is_muon_update(update(module, before, f"blocks.1.mlp.fc2.{part}"), 2e-3), part
    # the branch's vectors stay on AdamW with their multipliers (phases x4)
    assert is_adam_update(update(module, before, "blocks.1.mlp.fc2.act.phase1"), 4e-3)
    assert is_adam_update(update(module, before, "blocks.1.mlp.fc2.down.bias"), 1e-3)


def test_adamw_is_unchanged_by_the_new_fields():
    module, before, opt = stepped()
    assert isinstance(opt, torch.optim.AdamW)
    assert is_adam_update(update(module, before, "blocks.0.attn.q.weight"), 1e-3)


def test_one_schedule_scales_both_optimizers_and_the_state_round_trips():
    module, _, _ = stepped("optim.name=muon", "schedule.warmup_steps=50")
    opt, sched = module.optimizer_and_schedule()
    assert [g["lr"] for g in opt.param_groups][-1] == pytest.approx(2e-3 / 50)  # warm-up step 1 of llm-bytes' 50
    for _ in range(49):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and opt.muon.param_groups[0]["lr"] == pytest.approx(2e-3)
    saved = opt.state_dict()
    fresh, _ = module.optimizer_and_schedule()
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    with pytest.raises(NobleError, match="not Muon"):
        fresh.load_state_dict(opt.adamw.state_dict())


def test_identity_muon_settings_leave_adamw_runs_alone_and_the_branch_optimizer_pairs_with_one_baseline():
    def cfg(*sets):
        return recipes.resolve("llm-bytes", sets=list(sets))

    base = cfg()
    assert C.run_id(cfg("optim.muon_lr=0.05", "optim.branch_optimizer=muon")) == C.run_id(base)
    muon = cfg("optim.name=muon")
    assert C.run_id(muon) != C.run_id(base) and C.pair_key(muon) != C.pair_key(base)
    assert C.run_id(cfg("optim.name=muon", "optim.branch_optimizer=muon")) == C.run_id(muon)  # no branch: same run
    n_adamw = cfg("optim.name=muon", "noble.branch=cosnet")
    n_muon = cfg("optim.name=muon", "noble.branch=cosnet", "optim.branch_optimizer=muon")
    assert C.pair_key(n_adamw) == C.pair_key(n_muon) == C.pair_key(muon)
    assert len({C.run_id(n_adamw), C.run_id(n_muon)}) == 2 and C.variant_key(n_adamw) != C.variant_key(n_muon)
    assert (muon.variant, n_adamw.variant, n_muon.variant) == (
        "baseline | muon", "cosnet r8 | muon", "cosnet r8 | muon, branch muon")
    assert C.run_id(n_muon).startswith("llm-bytes-cosnet-r8-muon-branch-muon-s0-")
    assert cfg("noble.branch=cosnet").variant == "cosnet r8"


@pytest.mark.parametrize("sets, message", [
    (["optim.name=sgd"], "unknown optim.name 'sgd'; valid: adamw, muon"),
    (["optim.name=muon", "trainer.strategy=fsdp"], "cannot run under trainer.strategy fsdp"),
    (["optim.muon_ns_steps=0"], "optim.muon_ns_steps must be in [1, 100)"),
    (["optim.muon_adjust_lr_fn=rms"], "valid: original, match_rms_adamw, spectral_unclamped"),
])
def test_bad_optimizer_settings_are_one_line(sets, message):
    with pytest.raises(NobleError, match=re.escape(message)):
        recipes.resolve("llm-bytes", sets=sets)


def test_resume_after_kill_with_muon_reaches_the_same_losses(tmp_path):
    """Both optimizers' states (Muon's momentum, AdamW's moments) and the schedule come back from last.ckpt, under
    gradient accumulation and clipping: the killed-and-resumed run lands on the uninterrupted run's losses."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import killed_run, resume_matches_an_uninterrupted_run

    overrides = {"noble.branch": "cosnet", "optim.name": "muon", "trainer.max_steps": 8, "trainer.eval_every": 3,
                 "trainer.accumulate": 2, "optim.grad_clip": 0.05}
    cfg, run = killed_run(tmp_path, overrides, kill_at=5)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(ckpt["optimizer_states"][0]) == {"adamw", "muon"} and ckpt["optimizer_states"][0]["muon"]["state"]
    resume_matches_an_uninterrupted_run(tmp_path, cfg)


def test_muon_steps_a_gpt2_conv1d_weight_as_the_out_in_matrix_it_is():
    """A transformers GPT-2 baseline keeps its Conv1D layers, whose weights are stored (in, out); its NOBLE run has
    NobleLinear (out, in). Muon's shape adjustment reads (rows, cols) as (out, in), so uncorrected the baseline's
    c_fc (in 32, out 128) would step at scale 1 instead of 2 and its MLP projection at 2 instead of 1: the two arms
    would train at different per-layer rates. Read from one real step of the baseline."""
    pytest.importorskip("transformers")
    from noble_cli.tasks.optimizers import _muon_shape_scale

    assert _muon_shape_scale("original", 128, 32) == pytest.approx(2.0)  # torch's private formula, pinned
    assert _muon_shape_scale("original", 32, 128) == pytest.approx(1.0)
    sets = ["model.model_type=gpt2", "model.hidden_size=32", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.num_key_value_heads=null", "model.intermediate_size=null",
            "model.max_position_embeddings=32", "model.extra={n_inner: 128}", "data.seq_len=32",
            "optim.name=muon", "optim.muon_lr=2e-3", "optim.weight_decay=0", "schedule.warmup_steps=0"]
    module, before, _ = one_step(recipes.resolve("llama-bytes", sets=sets))
    conv1d = {n: p for n, p in module.model.named_parameters() if n.endswith(("c_attn.weight", "c_fc.weight",
                                                                               "c_proj.weight"))}
    assert len(conv1d) == 4 and conv1d["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    for name, p in conv1d.items():
        delta = (p.detach() - before[name]).T  # (out, in), the layout Muon's scale is defined on
        assert is_muon_update(delta, 2e-3), name
