"""Typed config: recipes, overrides, validation, hashing, parameter counts of the recipes."""

import pytest
import yaml

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.errors import NobleError
from noble_cli.layers import count_parameters
from noble_cli.models.bert import BertConfig
from noble_cli.models.gpt import GPT, GPTConfig
from noble_cli.models.vit import ViTConfig
from noble_cli.models.vqgan import VQGANConfig
from noble_cli.recipes import count_recipe_params
from noble_cli.tasks.base import build_model, dense_matched_config, lr_factor


def test_recipe_resolves_with_overrides_and_sets():
    cfg = recipes.resolve("llm-tiny", {"noble.branch": "cos_net", "trainer.max_steps": 7, "seed": None},
                    ["optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "model.n_layer=3", "trainer.compile=true"])
    assert cfg.noble.branch == "cosnet"  # the reference code's spelling is an alias
    assert cfg.trainer.max_steps == 7 and cfg.seed == 0
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.n_layer == 3 and cfg.trainer.compile is True
    assert cfg.variant == "cosnet r8"


def test_branch_only_settings_do_not_make_a_second_baseline():
    """noble.* settings that only a branch sees leave the baseline's identity alone (one run, trained once);
    what a dense-matched baseline is matched to does not."""
    base = recipes.resolve("llm-tiny")
    tweaked = recipes.resolve("llm-tiny", sets=["noble.mix_lr_power=0", "noble.rank=16", "noble.kernel=torch"])
    assert C.run_id(tweaked) == C.run_id(base) and C.variant_key(tweaked) == C.variant_key(base)
    assert C.pair_key(tweaked) == C.pair_key(base)
    cos = recipes.resolve("llm-tiny", {"noble.branch": "cosnet"})
    assert C.run_id(recipes.resolve("llm-tiny", {"noble.branch": "cosnet"}, ["noble.mix_lr_power=0"])) != C.run_id(cos)
    dense = [recipes.resolve("llm-tiny", {"noble.dense_match": True, "noble.rank": r}) for r in (8, 16)]
    assert C.run_id(dense[0]) != C.run_id(dense[1])
    assert C.pair_key(base, world_size=8) != C.pair_key(base) == C.pair_key(base, world_size=1)


def test_variant_labels_name_targets_and_an_explicit_kernel():
    label = lambda **kw: recipes.resolve("llm-tiny", {"noble.branch": "cosnet", **kw}).variant  # noqa: E731
    assert label() == "cosnet r8"
    assert label(**{"noble.targets": "mlp", "noble.rank": 4}) == "cosnet r4 mlp"
    torch_, triton_ = label(**{"noble.kernel": "torch"}), label(**{"noble.kernel": "triton"})
    assert (torch_, triton_) == ("cosnet r8 [torch]", "cosnet r8 [triton]")  # two rows of a report, not one name
    assert recipes.resolve("llm-tiny", {"noble.kernel": "torch"}).variant == "baseline"
    gelu = [recipes.resolve("llm-tiny", {"noble.branch": "gelu_net", "noble.kernel": k}) for k in ("auto", "triton")]
    assert gelu[1].variant == "gelu_net r8" and C.run_id(gelu[0]) == C.run_id(gelu[1])  # no fused gelu: same run


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_with_the_data():
    from noble_cli.tasks import causal_lm

    with pytest.raises(NobleError, match="smaller than the GPT-2 vocabulary"):
        causal_lm.TASK.build_datamodule(recipes.resolve("llm-tiny", sets=["model.vocab_size=100"]))


def test_a_recipe_section_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: causal_lm\noptim: 3\n")
    with pytest.raises(NobleError, match="config section optim must be a mapping of keys, got 3"):
        recipes.resolve(str(bad))


def test_set_values_are_coerced_to_the_field_types():
    cfg = recipes.resolve("llm-tiny", sets=["trainer.max_steps=1e3", "name=123", "noble.main_init_scale=null",
                                      "optim.grad_clip=null", "trainer.compile=1"])
    assert cfg.trainer.max_steps == 1000 and cfg.name == "123" and cfg.noble.main_init_scale is None
    assert cfg.optim.grad_clip is None and cfg.trainer.compile is True
    for bad in ("optim.lr=true", "trainer.max_steps=false", "optim.lr=inf", "noble.up_init_scale=nan",
                "trainer.compile=2"):
        with pytest.raises(NobleError, match="must be of type"):
            recipes.resolve("llm-tiny", sets=[bad])


def test_saved_config_round_trips_to_the_same_hash(tmp_path):
    cfg = recipes.resolve("llm-tiny", {"noble.branch": "gelu_net"})
    path = tmp_path / "my.yaml"
    path.write_text(C.to_yaml(cfg))
    again = recipes.resolve(str(path))  # a user's own YAML file is a recipe too
    assert C.config_hash(again) == C.config_hash(cfg)
    assert C.run_id(again) == C.run_id(cfg)


def test_hash_and_pairing_keys():
    base = recipes.resolve("llm-tiny")
    variant = recipes.resolve("llm-tiny", {"noble.branch": "cosnet"})
    seed1 = recipes.resolve("llm-tiny", {"seed": 1})
    two_gpus = recipes.resolve("llm-tiny", {"trainer.devices": 2})
    assert C.pair_key(base) == C.pair_key(variant) == C.pair_key(seed1)
    assert C.config_hash(base) != C.config_hash(variant) != C.config_hash(seed1)
    assert C.config_hash(base) == C.config_hash(two_gpus), "where a run goes is not what it computes"
    assert C.variant_key(base) == C.variant_key(seed1) != C.variant_key(variant)
    assert C.pair_key(recipes.resolve("llm-tiny", {"trainer.max_steps": 5})) != C.pair_key(base)


@pytest.mark.parametrize(
    "recipe, overrides, sets, message",
    [
        ("llm-huge", {}, [], "unknown recipe 'llm-huge'; valid: .*llm-tiny"),
        ("llm-tiny", {"noble.branch": "relu9"}, [], "unknown activation 'relu9'; valid: .*cosnet"),
        ("llm-tiny", {"noble.targets": "everything"}, [], "unknown target 'everything'"),
        ("llm-tiny", {}, ["optim.lr"], "malformed --set 'optim.lr'; expected section.key=value"),
        ("llm-tiny", {}, ["optim.learning_rate=3"], "unknown key optim.learning_rate; valid: .*lr"),
        ("llm-tiny", {}, ["model.width=3"], "unknown key model.width; valid: .*d_model"),
        ("llm-tiny", {}, ["optimizer.lr=3"], "unknown config section 'optimizer'"),
        ("llm-tiny", {"noble.kernel": "cuda"}, [], "unknown kernel 'cuda'; valid: .*triton"),
        ("llm-tiny", {"trainer.max_steps": 0}, [], "trainer.max_steps must be >= 1"),
        ("llm-tiny", {}, ["data.seq_len=4096"], r"data.seq_len must be in \[1, model.block_size = 64\]"),
        ("llm-tiny", {}, ["optim.betas=0.9"], "optim.betas must be of type tuple"),
        ("llm-tiny", {}, ["optim.betas=[0.9]"], "optim.betas must be a list of 2 values"),
        ("llm-tiny", {}, ["optim.betas=[0.9, 1.5]"], r"optim.betas must be two values in \[0, 1\)"),
        ("llm-tiny", {}, ["data.seq_len=null"], "data.seq_len must be of type int, got null"),
        ("llm-tiny", {}, ["schedule.min_lr_ratio=2"], r"schedule.min_lr_ratio must be in \[0, 1\]"),
        ("llm-tiny", {}, ["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
        ("llm-tiny", {}, ["trainer.precision=fp8"], "unknown trainer.precision 'fp8'; valid: .*bf16-mixed"),
        ("llm-tiny", {}, ["trainer.log_every=0"], "trainer.log_every must be >= 1"),
        ("llm-tiny", {"seed": -1}, [], r"seed must be in \[0, 2\^32\)"),
        ("llm-tiny", {}, ["model.n_head=0"], "model.n_head must be >= 1"),
        ("llm-tiny", {}, ["model.dropout=2"], r"model.dropout must be in \[0, 1\)"),
        ("llm-tiny", {}, ["data.dataset=nope"], "nope"),
    ],
)
def test_bad_input_names_what_is_valid(recipe, overrides, sets, message):
    with pytest.raises(NobleError, match=message):
        recipes.resolve(recipe, overrides, sets)


def test_every_recipe_resolves_and_the_paper_shapes_have_the_paper_sizes():
    for name in recipes.list_recipes():
        recipes.resolve(name)
    total, _ = count_recipe_params(recipes.resolve("llm-250m"))
    assert 240e6 < total < 270e6
    total, _ = count_recipe_params(recipes.resolve("llm-1.5b"))
    assert 1.45e9 < total < 1.65e9


def test_llm_250m_branch_overhead_is_the_measured_figure():
    # NOBLE.md: CosNet r=64 on Q, K, V, O, fc, fc2 at the llm-250m shape adds 7.6% parameters
    total, branch = count_recipe_params(recipes.resolve("llm-250m", {"noble.branch": "cosnet"}))
    assert branch / (total - branch) == pytest.approx(0.076, abs=0.002)


def test_dense_matched_baseline_has_the_noble_parameter_count():
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32)
    noble = C.NobleConfig(branch="none", rank=4, dense_match=True, match_branch="cosnet")
    target = count_parameters(build_model(GPT, cfg, noble.model_copy(update={"branch": "cosnet", "dense_match": False})))
    wide = dense_matched_config(GPT, cfg, noble)
    assert wide.mlp_hidden > cfg.mlp_hidden
    matched = count_parameters(build_model(GPT, cfg, noble))
    assert matched.branch == 0
    per_unit = 2 * (2 * 32)  # one more hidden unit adds a row of fc and a column of fc2 in each of 2 blocks
    assert abs(matched.total - target.total) <= per_unit / 2


@pytest.mark.parametrize("make_cfg", [
    lambda **kw: GPTConfig(vocab_size=100, block_size=16, n_layer=2, **kw),
    lambda **kw: BertConfig(vocab_size=100, n_layer=2, **kw),
    lambda **kw: ViTConfig(image_size=28, patch_size=7, num_classes=10, n_layer=2, **kw),
    lambda **kw: VQGANConfig(image_size=16, patch_size=4, n_layer=1, **kw),
], ids=["gpt", "bert", "vit", "vqgan"])
def test_built_in_model_configs_keep_the_widening_contract(make_cfg):
    cfg = make_cfg(d_model=48, n_head=4, mlp_ratio=4.0)
    assert cfg.mlp_hidden == 192
    wide = cfg.with_mlp_hidden(200)
    assert type(wide) is type(cfg) and wide.mlp_hidden == 200 and wide.d_model == 48
    with pytest.raises(ValueError, match="model.d_model 48 must be divisible by model.n_head 5"):
        make_cfg(d_model=48, n_head=5)


@pytest.mark.parametrize("config_class", [ViTConfig, VQGANConfig])
def test_patch_transformers_tile_the_image_with_patches(config_class):
    assert config_class(image_size=28, patch_size=7, d_model=32, n_head=2).grid == 4
    with pytest.raises(ValueError, match="model.image_size 28 must be a multiple of model.patch_size 8"):
        config_class(image_size=28, patch_size=8, d_model=32, n_head=2)


def test_dense_matched_control_names_a_config_it_cannot_widen():
    class Fixed(C.ConfigModel):
        d_model: int = 32

    with pytest.raises(NobleError, match="cannot widen a Fixed.*WidensMLP"):
        dense_matched_config(GPT, Fixed(), C.NobleConfig(branch="none", dense_match=True))


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lambda s: lr_factor(s, max_steps=100, warmup=10, decay="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay: cos(pi/2) = 0
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "constant", 0.1) == 1.0
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)


def test_recipe_files_mirror_the_dataclasses():
    for name in recipes.list_recipes():
        raw = yaml.safe_load((recipes.recipes_dir() / f"{name}.yaml").read_text())
        for section in C.SECTIONS:
            known = set(C.SECTIONS[section].model_fields)
            assert set(raw.get(section) or {}) <= known, (name, section)


# --- the init-only control, own-init, labels ----------------------------------------------------------------------
def test_init_only_control_config_identity_and_label():
    base = recipes.resolve("llm-tiny")
    ctl = recipes.resolve("llm-tiny", {"noble.init_only": True})
    assert ctl.variant == "init-only(main-init 0.5)" and C.pair_key(ctl) == C.pair_key(base)
    assert C.run_id(ctl) != C.run_id(base) and C.variant_key(ctl) != C.variant_key(base)
    from noble_cli.roles import role_of_config

    assert (role_of_config(base), role_of_config(ctl)) == ("baseline", "init")
    # its identity is what it reads (the scale and the layers), nothing a branch alone would see
    same = recipes.resolve("llm-tiny", {"noble.init_only": True}, ["noble.rank=4", "noble.mix_lr_power=0",
                                                              "noble.up_init_scale=0.1", "noble.kernel=torch"])
    assert C.run_id(same) == C.run_id(ctl)
    other = [recipes.resolve("llm-tiny", {"noble.init_only": True}, [s])
             for s in ("noble.main_init_scale=0.25", "noble.targets=mlp")]
    assert len({C.run_id(c) for c in other + [ctl]}) == 3
    assert recipes.resolve("llm-tiny", {"noble.init_only": True, "noble.targets": "mlp"},
                     ["noble.main_init_scale=0.25"]).variant == "init-only(main-init 0.25 mlp)"
    for overrides, sets, message in (
        ({"noble.init_only": True, "noble.branch": "cosnet"}, [], "noble.init_only is a control without a branch"),
        ({"noble.init_only": True, "noble.dense_match": True}, [], "noble.init_only is a control without a branch"),
        ({"noble.init_only": True}, ["noble.main_init_scale=null"], "which is null: set a number > 0"),
    ):
        with pytest.raises(NobleError, match=message):
            recipes.resolve("llm-tiny", overrides, sets)


def test_labels_name_every_branch_setting_away_from_its_default():
    label = lambda *sets: recipes.resolve("llm-tiny", {"noble.branch": "cosnet"}, list(sets)).variant  # noqa: E731
    assert label() == "cosnet r8"
    assert label("noble.main_init_scale=null") == "cosnet r8 own-init"  # was "cosnet r8" like the paper's init
    assert label("noble.main_init_scale=0.25") == "cosnet r8 main-init 0.25"
    assert label("noble.up_init_scale=0.1", "noble.up_lr_power=0.2", "noble.mix_lr_power=0", "noble.freq_lr_mult=1",
                 "noble.phase_lr_mult=1") == "cosnet r8 up-init 0.1 up-lr^0.2 mix-lr^0 freq-lr x1 phase-lr x1"
    own = recipes.resolve("llm-tiny", {"noble.branch": "cosnet"}, ["noble.main_init_scale=null"])
    # run ids keep the label they always had (existing folders keep their names); the config hash tells them apart
    assert C.run_id(own).startswith("llm-tiny-cosnet-r8-s0-") and C.run_id(own) != C.run_id(recipes.resolve(
        "llm-tiny", {"noble.branch": "cosnet"}))
    dense = recipes.resolve("llm-tiny", {"noble.dense_match": True, "noble.targets": "mlp"})
    assert dense.variant == "dense-matched(cosnet r8 mlp)"
    assert recipes.resolve("llm-tiny", {"noble.dense_match": True}).variant == "dense-matched(cosnet r8)"


def test_init_only_model_reinitialises_the_targeted_main_weights_and_adds_no_branch():
    import math
    import re

    import torch

    from noble_cli.layers import NobleLinear

    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=64, bias=True)

    def build(noble):
        torch.manual_seed(0)  # the same draws up to the re-init: untouched weights must come out equal
        return build_model(GPT, cfg, noble)

    plain = dict(build(C.NobleConfig()).named_parameters())
    ctl = build(C.NobleConfig(init_only=True))  # the paper's 0.5 on every attention and MLP linear
    assert not any(isinstance(m, NobleLinear) for m in ctl.modules())
    assert count_parameters(ctl).branch == 0 and count_parameters(ctl).total == sum(p.numel() for p in plain.values())
    linear = re.compile(r"blocks\.\d\.(attn\.[qkvo]|mlp\.fc2?)\.(weight|bias)$")
    for name, p in ctl.named_parameters():
        if linear.match(name) and name.endswith("weight"):
            # N(0, (0.5/sqrt(in))^2): in = 64 -> std 0.0625; fc2, in = 256 -> 0.03125 (GPT's own: 0.02, less on fc2/o)
            assert p.std().item() == pytest.approx(0.5 / math.sqrt(p.shape[1]), rel=0.06), name
        elif linear.match(name):
            assert torch.count_nonzero(p) == 0, name  # bias 0
        else:
            assert torch.equal(p, plain[name]), name  # embeddings, norms, the head: the model's own init
    assert plain["blocks.0.attn.q.weight"].std().item() == pytest.approx(0.02, rel=0.06)

    mlp = dict(build(C.NobleConfig(init_only=True, targets="mlp", main_init_scale=0.25)).named_parameters())
    assert torch.equal(mlp["blocks.1.attn.q.weight"], plain["blocks.1.attn.q.weight"])
    assert mlp["blocks.1.mlp.fc.weight"].std().item() == pytest.approx(0.25 / 8, rel=0.06)
    assert mlp["blocks.1.mlp.fc2.weight"].std().item() == pytest.approx(0.25 / 16, rel=0.06)


def test_own_init_noble_keeps_the_models_main_weights():
    import torch

    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, d_model=64)
    torch.manual_seed(0)
    plain = dict(build_model(GPT, cfg, C.NobleConfig()).named_parameters())
    torch.manual_seed(0)
    own = dict(build_model(GPT, cfg, C.NobleConfig(branch="cosnet", rank=4, main_init_scale=None)).named_parameters())
    assert torch.equal(own["blocks.0.attn.q.weight"], plain["blocks.0.attn.q.weight"])
    assert "blocks.0.attn.q.down.weight" in own
