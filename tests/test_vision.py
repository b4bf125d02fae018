"""Vision tasks on the CPU: ViT and VQGAN tiny recipes train, Mixup/CutMix switches, the quantizer's gradients, PSNR,
image tokens through a VQGAN checkpoint into LM shards, the image-token LM, where NOBLE lands, data loading errors."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.data import images as I
from noble_cli.errors import NobleError
from noble_cli.layers import noble_layers
from noble_cli.models.vqgan import VectorQuantizer, psnr
from noble_cli.train.run import train

HAVE_FASHION = all((I.FASHION_MNIST_DIR / f"{s}.gz").is_file() for pair in I.FASHION_MNIST_FILES.values()
                   for s in pair)
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install -y dataset-fashion-mnist")

# Short runs of the tiny recipes (the recipes themselves run ~200 steps).
FAST = ["trainer.num_workers=0", "trainer.eval_batches=2", "trainer.kernel_warmup_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


# ---------------------------------------------------------------------------------------------------------------
# data


def write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion(root: Path, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for split, (img_name, lab_name) in I.FASHION_MNIST_FILES.items():
        write_idx(root / f"{img_name}.gz", images)
        write_idx(root / f"{lab_name}.gz", labels)
    return images, labels


def test_idx_files_load_through_the_same_code(tmp_path):
    images, labels = fake_fashion(tmp_path)
    assert np.array_equal(I.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    source = I.resolve_image_dataset("fashion-mnist", tmp_path)
    ds, n_classes = I.load_split(source, "val", I.classification_transform(source, 28, 1, train=False))
    x, y = ds[3]
    assert n_classes == 10 and len(ds) == 12 and y == 3
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    raw = torch.from_numpy(images[3]).float() / 255
    assert torch.allclose(x[0] * 0.3530 + 0.2860, raw, atol=1e-5)  # normalized with Fashion-MNIST's statistics

    dm = I.ImageDataModule("fashion-mnist", str(tmp_path), batch_size=4, eval_batches=2, seed=0,
                           train_transform=I.classification_transform(source, 28, 1, True, True, 0.25),
                           eval_transform=I.classification_transform(source, 28, 1, False),
                           train_collate=lambda k: I.MixCollate(I.BatchMixer(k, True, True)))
    dm.setup()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.shape == (4, 10)
    assert len(dm.val_set) == 8


def test_missing_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(NobleError) as e:
        I.load_split(I.resolve_image_dataset("fashion-mnist"), "train")
    msg = str(e.value)
    assert msg == (f"Fashion-MNIST not found at {tmp_path / 'absent'}; install it with: "
                   "apt-get install -y dataset-fashion-mnist")
    with pytest.raises(NobleError, match="unknown image dataset"):
        I.resolve_image_dataset("no-such-set")
    with pytest.raises(NobleError, match="does not exist"):
        I.resolve_image_dataset(str(tmp_path / "nothing" / "here"))


def _png_tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_tree(tmp_path):
    _png_tree(tmp_path / "split" / "train")
    _png_tree(tmp_path / "split" / "val", per_class=1)
    source = I.resolve_image_dataset(str(tmp_path / "split"))
    assert source.kind == "folder"
    train_tf = I.classification_transform(source, 16, 3, train=True, randaugment=True, random_erasing=1.0)
    ds, n = I.load_split(source, "train", train_tf)
    x, y = ds[0]
    assert n == 2 and len(ds) == 6 and x.shape == (3, 16, 16) and y == 0
    val, _ = I.load_split(source, "val", I.classification_transform(source, 16, 1, train=False))
    assert len(val) == 2 and val[1][0].shape == (1, 16, 16)  # RGB photos to a grey model

    # val/ without one of train/'s classes keeps train/'s label numbers; a class train/ lacks is refused
    _png_tree(tmp_path / "gap" / "train", classes=("ant", "bee", "cat"), per_class=1)
    _png_tree(tmp_path / "gap" / "val", classes=("ant", "cat"), per_class=1)
    gap, _ = I.load_split(I.resolve_image_dataset(str(tmp_path / "gap")), "val")
    assert [label for _, label in gap.samples] == [0, 2]
    _png_tree(tmp_path / "gap" / "val", classes=("dog",), per_class=1)
    with pytest.raises(NobleError, match="class folders that .* lacks: dog"):
        I.load_split(I.resolve_image_dataset(str(tmp_path / "gap")), "val")

    _png_tree(tmp_path / "flat", per_class=10)  # one tree: split by a hash of the file path
    flat = I.resolve_image_dataset(str(tmp_path / "flat"))
    tr, _ = I.load_split(flat, "train")
    va, _ = I.load_split(flat, "val")
    assert len(tr) + len(va) == 20 and len(va) >= 1


# ---------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def _batch(n: int = 16, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("mixup,cutmix", [(True, True), (True, False), (False, True)])
def test_mixup_cutmix_mix(mixup, cutmix):
    torch.manual_seed(0)
    images, labels = _batch()
    mixer = I.BatchMixer(10, mixup=mixup, cutmix=cutmix, mixup_alpha=0.8, cutmix_alpha=1.0)
    changed = soft = 0
    for _ in range(5):
        out, targets = mixer(images.clone(), labels)
        assert targets.shape == (16, 10)
        assert torch.allclose(targets.sum(dim=1), torch.ones(16))
        changed += not torch.equal(out, images)
        soft += bool(((targets > 0) & (targets < 1)).any())
    assert changed and soft


def test_mixup_cutmix_off_is_identity():
    images, labels = _batch()
    collate = I.MixCollate(I.BatchMixer(10, mixup=False, cutmix=False))
    out, targets = collate([(images[i], int(labels[i])) for i in range(16)])
    assert torch.equal(out, images)
    assert torch.equal(targets, F.one_hot(labels, 10).float())


def test_vit_datamodule_follows_the_switches():
    from noble_cli.tasks import vit

    on = vit.TASK.build_datamodule(recipes.resolve("vit-tiny"))
    off = vit.TASK.build_datamodule(recipes.resolve("vit-tiny", {"data.mixup": False, "data.cutmix": False}))
    assert on.train_collate_factory(10).mixer.enabled
    assert not off.train_collate_factory(10).mixer.enabled


# ---------------------------------------------------------------------------------------------------------------
# models


def test_noble_lands_on_qkvo_fc_fc2_only():
    from noble_cli.tasks import vit, vqgan

    for task, recipe, blocks in ((vit, "vit-tiny", 4), (vqgan, "vqgan-tiny", 4)):
        cfg = recipes.resolve(recipe, {"noble.branch": "cosnet"})
        module = task.TASK.build_module(cfg)
        names = [n for n, _ in noble_layers(module.model)]
        assert len(names) == 6 * blocks, recipe
        assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names} == {
            "attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.fc2"}
        assert module.params.branch > 0
        # the baseline has the same modules, none augmented
        assert not noble_layers(task.TASK.build_module(recipes.resolve(recipe)).model)


def test_quantizer_straight_through_and_codebook_gradients():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, dim=4)
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = q(z)
    dist = torch.cdist(z.detach().reshape(-1, 4), q.codebook.weight.detach())
    assert torch.equal(out.codes.reshape(-1), dist.argmin(dim=1))
    assert torch.allclose(out.z_q, q.codebook.weight[out.codes])  # forward value: the chosen codes

    g = torch.randn_like(z)
    (out.z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # straight through: the encoder gets exactly the decoder's gradient
    assert q.codebook.weight.grad is None  # ... and the codebook nothing from that path

    z.grad = None
    out = q(z)
    out.commitment_loss.backward()
    assert q.codebook.weight.grad is None and z.grad.abs().sum() > 0
    z.grad = None
    out.codebook_loss.backward()
    assert z.grad is None and q.codebook.weight.grad.abs().sum() > 0

    assert 1.0 <= float(out.perplexity) <= 16.0


def test_dead_codes_restart_from_recent_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=8, dim=3, recent_size=64)
    with torch.no_grad():
        q.codebook.weight[:] = torch.randn(8, 3) * 0.01
        q.codebook.weight[0] = torch.tensor([10.0, 10.0, 10.0])  # far from every input: never chosen
    z = torch.randn(32, 3)
    q(z)
    dead = (q.hits == 0).clone()
    assert dead[0]
    n = q.restart_dead_codes()
    assert n == int(dead.sum())
    recent = q.recent[: int(q.recent_filled)]
    for i in torch.nonzero(dead).flatten():
        assert (recent - q.codebook.weight[i]).abs().sum(dim=1).min() < 1e-6
    assert q.hits.sum() == 0


def test_psnr_on_known_images():
    x = torch.rand(4, 3, 8, 8)
    sign = torch.where(torch.rand_like(x) > 0.5, 1.0, -1.0)
    assert float(psnr(x + 0.1 * sign, x)) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 on [0, 1] images
    assert float(psnr(x + 0.01 * sign, x)) == pytest.approx(40.0, abs=1e-3)


def test_config_errors_are_one_line():
    with pytest.raises(NobleError, match="classes"):
        recipes.resolve("vit-tiny", sets=["model.num_classes=5"])
    with pytest.raises(NobleError, match="multiple of model.patch_size"):
        recipes.resolve("vit-tiny", sets=["model.patch_size=5"])
    with pytest.raises(NobleError, match="accumulate must be 1"):
        recipes.resolve("vqgan-tiny", sets=["trainer.accumulate=2"])
    with pytest.raises(NobleError, match="random_erasing"):
        recipes.resolve("vit-tiny", {"data.random_erasing": 1.5})


# ---------------------------------------------------------------------------------------------------------------
# training (real Fashion-MNIST)


@needs_fashion
def test_vit_tiny_trains(tmp_path):
    cfg = recipes.resolve("vit-tiny", {"noble.branch": "cosnet"}, FAST + [
        "trainer.max_steps=40", "trainer.eval_every=20", "trainer.batch_size=64", "schedule.warmup_steps=5"])
    result = train(cfg, out=tmp_path, progress=False)
    m = metrics(result.run_dir)
    evals = m.dropna(subset=["eval_loss"])
    assert list(evals["step"]) == [20, 40]
    assert evals["eval_loss"].iloc[-1] < math.log(10) - 0.2  # chance is ln 10
    assert m["train_loss"].tail(10).mean() < m["train_loss"].head(3).mean()
    for col in ("eval_top1", "eval_top5", "images_per_s"):
        assert col in m and m[col].notna().any(), col
    assert (evals["eval_top5"] >= evals["eval_top1"]).all()
    assert result.summary["best_eval_top1"] == pytest.approx(evals["eval_top1"].max())


class _Jittered(torch.utils.data.Dataset):
    """Item i = (i + random noise, i): its randomness stands in for an image's random augmentations."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1), i


def _mix_collate(items):  # stands in for Mixup: a random draw per batch
    x, y = torch.utils.data.default_collate(items)
    return x + torch.rand(1), y


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_resumable_loader_restarts_at_any_position_with_the_same_draws(world, rank):
    """Batches (order, per-sample and per-batch randomness) from position p on are those of an uninterrupted
    iteration, across the ends of passes over the data; each pass is a new permutation; every rank its share."""
    from noble_cli.data.resumable import resumable_train_loader

    def loader(at, total=12):
        return resumable_train_loader(_Jittered(), batch_size=2, seed=5, rank=rank, world=world,
                                      total_batches=total, position=lambda: at, collate=_mix_collate)

    per_pass = 10 // world // 2
    stream = list(loader(0))  # what an uninterrupted run sees
    assert len(stream) == len(loader(0)) == 12
    for at in (1, per_pass, per_pass + 1, 7, 11):
        resumed = list(loader(at))
        assert len(resumed) == 12 - at and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                               for a, b in zip(resumed, stream[at:])), at
    passes = [torch.cat([b[1] for b in stream[p * per_pass:(p + 1) * per_pass]]).tolist() for p in range(2)]
    assert passes[0] != passes[1] and len(set(passes[0])) == len(passes[0])
    assert len({float(b[0][0, 0]) for b in stream}) == len(stream)  # the noise differs batch to batch
    other = [torch.cat([b[1] for b in resumable_train_loader(
        _Jittered(), batch_size=2, seed=5, rank=r, world=2, total_batches=2, position=lambda: 0,
        collate=_mix_collate)]) for r in (0, 1)]
    assert not set(other[0].tolist()) & set(other[1].tolist())  # ranks never share a sample within a pass


def test_image_run_resumes_exactly_when_passes_do_not_divide_by_the_accumulation(tmp_path):
    """7 batches per pass over the data, 4 micro-batches per step: a pass ends mid-step, which must neither force a
    step nor shift the data (a per-epoch loader would hang or skip batches here); resume after a stop is exact."""
    import lightning as L

    _png_tree(tmp_path / "tree" / "train", classes=("a", "b"), per_class=7)
    _png_tree(tmp_path / "tree" / "val", classes=("a", "b"), per_class=1)
    cfg = recipes.resolve("vit-tiny", {"noble.branch": "cosnet"}, FAST + [
        f"data.dataset={tmp_path / 'tree'}", "model.num_classes=2", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.batch_size=2", "trainer.accumulate=4", "trainer.eval_batches=1", "schedule.warmup_steps=1"])

    class StopAt4(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                raise KeyboardInterrupt

    straight = metrics(train(cfg, out=tmp_path / "a", progress=False).run_dir)
    assert list(straight["step"]) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(NobleError, match="interrupted at step 4"):
        train(cfg, out=tmp_path / "b", progress=False, callbacks=[StopAt4()])
    resumed = metrics(train(cfg, out=tmp_path / "b", resume=True, progress=False).run_dir)  # from step 3
    pd.testing.assert_series_equal(resumed.set_index("step")["train_loss"], straight.set_index("step")["train_loss"],
                                   rtol=1e-5, atol=0)


@needs_fashion
def test_vit_resume_after_interruption_reaches_the_same_losses(tmp_path):
    """Mixup/CutMix, RandAugment, random erasing, drop-path and a loader worker: an interrupted and resumed run
    trains on the same batches, with the same draws, as an uninterrupted one."""
    import lightning as L

    cfg = recipes.resolve("vit-tiny", {"noble.branch": "cosnet"}, FAST + [
        "trainer.max_steps=8", "trainer.eval_every=4", "trainer.batch_size=16", "schedule.warmup_steps=2",
        "model.drop_path=0.1", "trainer.num_workers=1"])

    class StopAt6(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                raise KeyboardInterrupt

    straight = metrics(train(cfg, out=tmp_path / "a", progress=False).run_dir)
    with pytest.raises(NobleError, match="interrupted at step 6"):
        train(cfg, out=tmp_path / "b", progress=False, callbacks=[StopAt6()])
    resumed = metrics(train(cfg, out=tmp_path / "b", resume=True, progress=False).run_dir)  # from step 4
    pd.testing.assert_series_equal(resumed.set_index("step")["train_loss"], straight.set_index("step")["train_loss"],
                                   rtol=1e-5, atol=0)
    pd.testing.assert_series_equal(resumed["eval_loss"].dropna(), straight["eval_loss"].dropna(), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def vqgan_run(tmp_path_factory):
    if not HAVE_FASHION:
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vqgan")
    cfg = recipes.resolve("vqgan-tiny", sets=FAST + [
        "trainer.max_steps=40", "trainer.eval_every=20", "trainer.batch_size=32", "schedule.warmup_steps=5",
        "model.disc_start=20", "model.restart_every=10"])
    return train(cfg, out=out, progress=False)


def test_vqgan_tiny_trains_with_its_discriminator(vqgan_run):
    m = metrics(vqgan_run.run_dir)
    assert vqgan_run.summary["steps"] == 40  # generator steps: the discriminator's steps are not counted
    assert list(m["step"]) == list(range(1, 41))
    assert m["train_loss"].tail(5).mean() < 0.5 * m["train_loss"].head(3).mean()
    evals = m.dropna(subset=["eval_loss"])
    assert list(evals["step"]) == [20, 40]
    assert (evals["eval_psnr"] > 10).all() and (evals["eval_perplexity"] > 1).all()
    assert (vqgan_run.run_dir / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(vqgan_run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2  # generator and discriminator
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])


def test_image_tokens_round_trip(vqgan_run, tmp_path):
    from noble_cli.data import image_tokens as T
    from noble_cli.data import shards

    folder = T.encode_dataset(vqgan_run.run_dir, limit=40, cache_dir=tmp_path / "codes", batch_size=16)
    meta = T.read_token_meta(folder)
    assert meta["vocab_size"] == 257 and meta["bos_id"] == 256 and meta["codes_per_image"] == 49
    assert meta["images"] == {"train": 40, "val": 40}
    assert shards.is_prepared(folder) and shards.verify(folder)
    flat = shards.load_tokens(folder, "val")
    assert flat.dtype == np.uint16 and flat.size == 40 * 50

    records = T.load_records(folder, "val")
    assert (records[:, 0] == 256).all() and records[:, 1:].max() < 256
    module = T.load_vqgan(T.resolve_checkpoint(vqgan_run.run_dir))
    source = I.resolve_image_dataset("fashion-mnist")
    ds, _ = I.load_split(source, "val", I.reconstruction_transform(source, 28, 1, train=False))
    x = torch.stack([ds[i][0] for i in range(40)]).as_subclass(torch.Tensor)
    codes = module.model.tokenize(x * 2 - 1)
    assert np.array_equal(T.load_codes(folder, "val"), codes.numpy())  # encode -> cache -> read back the same
    recon = module.model.decode_codes(torch.from_numpy(T.load_codes(folder, "val")[:3].astype(np.int64)))
    assert recon.shape == (3, 1, 28, 28)

    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert T.encode_dataset(vqgan_run.run_dir, limit=40, cache_dir=tmp_path / "codes") == folder  # cached
    assert (folder / "train.bin").stat().st_mtime_ns == stamp

    dm = T.ImageTokenDataModule(str(vqgan_run.run_dir), batch_size=4, eval_batches=1, seed=0, limit=40,
                                cache_dir=str(tmp_path / "codes"))
    dm.prepare_data()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == yb.shape == (4, 49) and (xb[:, 0] == 256).all()
    assert torch.equal(xb[:, 1:], yb[:, :-1])


def test_image_lm_trains_on_the_codes(vqgan_run, tmp_path):
    from noble_cli.models.gpt import GPT
    from noble_cli.tasks import image_lm
    from noble_cli.tasks.causal_lm import CausalLM

    sets = FAST + [f"data.vqgan_checkpoint={vqgan_run.run_dir}", "data.limit=256",
                   f"data.cache_dir={tmp_path / 'codes'}", "trainer.max_steps=30", "trainer.eval_every=15",
                   "trainer.batch_size=16", "schedule.warmup_steps=5"]
    cfg = recipes.resolve("image-lm-tiny", {"noble.branch": "cosnet"}, sets)
    module = image_lm.TASK.build_module(cfg)
    assert isinstance(module, CausalLM) and isinstance(module.model, GPT)
    result = train(cfg, out=tmp_path, progress=False)
    evals = metrics(result.run_dir).dropna(subset=["eval_loss"])
    assert evals["eval_loss"].iloc[-1] < math.log(257) - 0.5  # well below uniform over the codes
    # which VQGAN made the codes is part of the run's identity; FLOPs count the codes per image
    fingerprint = result.meta["data_identity"]["vqgan_checkpoint"]
    assert len(fingerprint) == 12 and result.meta["pair_key"] != C.pair_key(cfg)
    assert module.seq_len == 49  # 28 px at patch 4 -> 7 x 7 codes

    with pytest.raises(NobleError, match="model.vocab_size=257"):
        image_lm.TASK.build_datamodule(recipes.resolve("image-lm-tiny", sets=sets + ["model.vocab_size=300"]))
    with pytest.raises(NobleError, match="VQGAN checkpoint not found"):
        image_lm.TASK.build_datamodule(recipes.resolve("image-lm-tiny", sets=[f"data.vqgan_checkpoint={tmp_path / 'x'}"]))
