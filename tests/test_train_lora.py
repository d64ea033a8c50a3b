"""SubjectLoRAModule: trains only the LoRA, leaves the base untouched, resumes exactly after a kill."""

import math

import lightning as L
import pytest
import torch

from subjectpaint.base import ExemplarInpainter
from subjectpaint.errors import InvalidArgument
from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, make_room, product_photos
from trainers.annotate import foreground_box
from trainers.data import SubjectDataModule
from trainers.lora_module import SubjectLoRAModule, fit

KW = dict(rank=4, alpha=8, dropout=0.1, lr=1e-2, seed=5)


@pytest.fixture(scope="module")
def setup():
    base = ExemplarInpainter.tiny(0)
    photos = [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 3)]
    notes = [foreground_box(p) for p in photos]
    rooms = [make_room(s, 32) for s in range(4)]

    def data():
        return SubjectDataModule.for_base(base, photos, notes, backgrounds=rooms, batch_size=4, seed=1)

    return base, data


class Killed(Exception):
    pass


class Kill(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise Killed  # the process dies mid-run: nothing after this step is saved


def test_only_lora_trains_and_base_is_untouched(setup):
    base, data = setup
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    module = SubjectLoRAModule(base, **KW)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    fit(module, data(), 4, progress=False)
    after = base.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    sd = module.lora_state_dict()
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in sd)
    assert max(v.abs().max() for k, v in sd.items() if "lora_B" in k) > 0  # B moved off its zero init


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_killed_and_resumed_run_equals_uninterrupted(setup, tmp_path, schedule):
    base, data = setup
    kw = dict(KW, lr_schedule=schedule)
    full = SubjectLoRAModule(base, **kw)
    fit(full, data(), 10, progress=False)
    reference = full.lora_state_dict()

    killed = SubjectLoRAModule(base, **kw)
    with pytest.raises(Killed):
        fit(killed, data(), 10, tmp_path, every=3, progress=False, callbacks=[Kill(7)])
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(".lora_" in k for k in ckpt["state_dict"])  # checkpoints hold only the adapter

    resumed = SubjectLoRAModule(base, **kw)
    trainer = fit(resumed, data(), 10, tmp_path, every=3, progress=False)
    assert trainer.global_step == 10
    out = resumed.lora_state_dict()
    assert max((out[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    # and the adapter is not trivially equal to a fresh one
    assert max((out[k] - SubjectLoRAModule(base, **KW).lora_state_dict()[k]).abs().max().item() for k in out) > 1e-3


class LrLog(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_schedule_decays_the_lr_to_zero_at_max_steps(setup):
    base, data = setup
    log = LrLog()
    fit(SubjectLoRAModule(base, **dict(KW, lr_schedule="cosine")), data(), 8, progress=False, callbacks=[log])
    want = [KW["lr"] * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(8)]
    assert log.lrs == pytest.approx(want, rel=1e-9, abs=1e-12)  # step s trains at the cosine's value at s
    log = LrLog()
    fit(SubjectLoRAModule(base, **KW), data(), 3, progress=False, callbacks=[log])
    assert log.lrs == [KW["lr"]] * 3  # the default stays constant
    with pytest.raises(InvalidArgument, match="lr_schedule"):
        SubjectLoRAModule(base, **dict(KW, lr_schedule="linear"))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_loss_target_follows_the_bases_prediction_type(setup, kind):
    """A v-prediction base (the demo base) must be fine-tuned on v, an epsilon one (Paint by Example) on the noise:
    with the UNet answering zeros the loss is the mean square of exactly that target."""
    from diffusers import PNDMScheduler
    from subjectpaint.errors import InvalidArgument

    base, data = setup
    base = ExemplarInpainter(base.vae, base.unet, base.image_encoder,
                             PNDMScheduler.from_config(base.scheduler.config, prediction_type=kind),
                             base.feature_extractor)
    module = SubjectLoRAModule(base, **KW)
    seen = {}
    velocity, add_noise = module.noise.get_velocity, module.noise.add_noise
    module.noise.get_velocity = lambda *a: seen.setdefault("answer", velocity(*a))
    module.noise.add_noise = lambda x, n, t: (seen.setdefault("noise", n), add_noise(x, n, t))[1]
    module.unet.forward = lambda x, *a, **k: type("Out", (), {"sample": torch.zeros_like(x[:, :4])})()
    dm = data()
    dm.setup("fit")
    loss = module.training_step(next(iter(dm.train_dataloader())), 0)
    answer = seen["answer"] if kind == "v_prediction" else seen["noise"]
    assert ("answer" in seen) == (kind == "v_prediction")
    assert torch.allclose(loss, (answer.float() ** 2).mean())
    with pytest.raises(InvalidArgument, match="prediction_type"):
        SubjectLoRAModule(ExemplarInpainter(base.vae, base.unet, base.image_encoder,
                                            PNDMScheduler.from_config(base.scheduler.config, prediction_type="x"),
                                            base.feature_extractor), **KW)


class Teardown(L.Callback):
    """What Lightning's strategy teardown does on a GPU run (the module to the CPU), in a form a CPU run can show:
    the module, and with it the base's VAE and image encoder it shares, cast to float64 after the last step.
    With `fail`, the run is then interrupted (a killed run: Lightning calls no teardown hook of the module)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def on_train_end(self, trainer, pl_module):
        pl_module.to(torch.float64)
        if self.fail:
            raise RuntimeError("killed")


@pytest.mark.parametrize("how", ["fit", "plain Trainer.fit", "interrupted fit"])
def test_training_leaves_the_shared_base_where_it_was(setup, how):
    # the module shares the base's frozen VAE and image encoder; whatever the strategy does to the module,
    # the base must still be usable (same device and dtype) after training, also when the user drives the Trainer
    from trainers.lora_module import make_trainer

    base, data = setup
    module = SubjectLoRAModule(base, **KW)
    assert module.vae is base.vae and module.image_encoder is base.image_encoder
    if how == "fit":
        fit(module, data(), 2, progress=False, callbacks=[Teardown()])
    elif how == "plain Trainer.fit":
        make_trainer(2, progress=False, callbacks=[Teardown()]).fit(module, datamodule=data())
    else:
        with pytest.raises(RuntimeError, match="killed"):
            fit(module, data(), 2, progress=False, callbacks=[Teardown(fail=True)])
    # the callback did act on the module (its own LoRA factors; the frozen weights are the base's, put back)
    assert next(p for p in module.unet.parameters() if p.requires_grad).dtype == torch.float64
    for part in (base.vae, base.image_encoder, base.unet):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
        assert {p.device.type for p in part.parameters()} == {"cpu"}


def test_accelerator_follows_the_bases_device():
    from trainers.lora_module import accelerator_for

    assert accelerator_for("cpu") == ("cpu", 1)
    assert accelerator_for(torch.device("cuda:1")) == ("gpu", [1])
    assert accelerator_for("mps") == ("mps", 1)


def test_progress_bar_shows_the_label_not_a_negative_epoch_total(setup, capsys):
    # a step-limited run has max_epochs=-1; Lightning 2.6's rich bar printed it as "Epoch 0/-2"
    base, data = setup
    trainer = fit(SubjectLoRAModule(base, **KW), data(), 3, label="training blue-mug")
    assert isinstance(trainer.progress_bar_callback, L.pytorch.callbacks.ProgressBar)
    shown = capsys.readouterr()
    shown = shown.out + shown.err
    assert "training blue-mug" in shown and "3/3" in shown
    assert "/-2" not in shown and "Epoch" not in shown


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_right_after_the_optimizer_step(setup, accumulate):
    """No gradient lives through the next step's forward pass (Lightning alone clears them only after it), and
    accumulation still sums over its micro-batches."""
    base, data = setup
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append([p.grad is not None for p in module.parameters() if p.requires_grad])

    module = SubjectLoRAModule(base, **KW, accumulate=accumulate)
    fit(module, data(), 3, progress=False, callbacks=[Watch()], accumulate_grad_batches=accumulate)
    assert len(seen) == 3 * accumulate
    for i, grads in enumerate(seen):
        mid_accumulation = i % accumulate != 0
        assert all(grads) if mid_accumulation else not any(grads), (i, grads[:3])
