"""Training settings: a config read back from a run is the config that was written, a bad
value is refused with its flag, a recipe gives way to explicit flags, and the schedule
starts, peaks and ends where it says."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest

from convnet.core.errors import ConvnetError, RunError
from convnet.training.config import TrainConfig, check_config, lr_at, warmup_steps
from convnet.training.recipes import RECIPES, recipe, resolve_config


def test_a_config_comes_back_from_its_json_unchanged() -> None:
    for config in [*RECIPES.values(), TrainConfig(model="fastnet", lr=0.05, epochs=3, val_split=0.1, faithful=True)]:
        assert TrainConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config


@pytest.mark.parametrize(("key", "value"), [("epochs", "4"), ("epochs", True), ("lr", "fast"), ("tta", 1)])
def test_a_recorded_value_of_the_wrong_type_is_a_damaged_run(key: str, value: object) -> None:
    with pytest.raises(RunError, match=f"config value {key}=.* should be a .*the run folder is damaged"):
        TrainConfig.from_dict({key: value})


def test_faithful_turns_shuffling_off_and_refuses_what_departs_from_the_tutorial() -> None:
    assert TrainConfig(faithful=True).shuffle is False
    with pytest.raises(ConvnetError, match="--faithful .* cannot be combined with --augment flip"):
        check_config(TrainConfig(faithful=True, augment="flip"))
    with pytest.raises(ConvnetError, match="--faithful .* cannot be combined with --sampler balanced"):
        check_config(TrainConfig(faithful=True, sampler="balanced"))


def test_an_unknown_model_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ConvnetError, match="unknown model 'resnet9'; choose one of: seed, fastnet"):
        check_config(TrainConfig(model="resnet9"))


def test_flags_override_the_recipe_and_other_optimizers_drop_its_momentum() -> None:
    config = resolve_config("cpu", {"epochs": 3, "lr": None})
    assert config.epochs == 3 and config.lr == RECIPES["cpu"].lr  # None means "not given"
    adam = resolve_config("cpu", {"optimizer": "adam"})
    assert adam.optimizer == "adam" and adam.momentum == 0.0 and not adam.nesterov
    assert resolve_config(None, {"faithful": True}) == TrainConfig(faithful=True, shuffle=False)
    assert resolve_config(None, kind="cuda") == RECIPES["gpu"]
    assert recipe("cpu") is not RECIPES["cpu"]  # a copy: changing it leaves the recipe as it is


def test_data_whose_mirror_changes_class_gets_no_flips() -> None:
    config = resolve_config("cpu", hflip=False)
    assert config.augment == "translate" and config.tta is False
    with pytest.raises(ConvnetError, match="change class when mirrored"):
        resolve_config("cpu", {"augment": "flip"}, hflip=False)
    with pytest.raises(ConvnetError, match="unknown --recipe 'fastest'; choose one of: tutorial, cpu"):
        resolve_config("fastest")


def test_config_validation_names_the_flag() -> None:
    for bad, flag in [(dict(optimizer="lbfgs"), "--optimizer"), (dict(epochs=0), "--epochs"),
                      (dict(batch_size=0), "--batch-size"), (dict(lr=-1.0), "--lr"), (dict(lr=float("nan")), "--lr"),
                      (dict(momentum=1.0), "--momentum"), (dict(class_weight="inverse"), "--class-weight"),
                      (dict(sampler="weighted"), "--sampler"), (dict(val_every=0), "--val-every must be a number of "
                                                                     "epochs, 1 or more, got 0")]:
        with pytest.raises(ConvnetError, match=flag):
            check_config(TrainConfig(**bad))  # type: ignore[arg-type]
    assert TrainConfig(faithful=True).shuffle is False


def test_schedules() -> None:
    c = TrainConfig(lr=1.0, epochs=10, schedule="linear", warmup_epochs=1.0, batch_size=1000)  # 10 steps: 10,000
    lrs = [lr_at(c, s, 10) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] < 0.02
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    cos = replace(c, schedule="cosine")
    assert lr_at(cos, 9, 10) == 1.0 and abs(lr_at(cos, 54, 10) - 0.5) < 0.02
    assert lr_at(replace(c, schedule="constant"), 50, 10) == 1.0


def test_a_warm_up_is_never_a_handful_of_steps() -> None:
    """One warm-up epoch of 8 steps (960 images, batches of 128) lasts 79 steps, the steps of 10,000 images, as a
    sized epoch's; at most half a short run; a long epoch is its own length, and no warm-up stays none."""
    c = TrainConfig(lr=1.0, epochs=25, schedule="linear", warmup_epochs=1.0, batch_size=128)
    assert warmup_steps(c, 8) == 79 and lr_at(c, 7, 8) < 0.11 and lr_at(c, 78, 8) == 1.0
    assert warmup_steps(replace(c, epochs=4), 8) == 16  # half of 32 steps
    assert warmup_steps(c, 422) == 422 and warmup_steps(replace(c, warmup_epochs=0.0), 8) == 0


def test_recipes_are_valid_and_named() -> None:
    for name in RECIPES:
        check_config(recipe(name))
    assert recipe("tutorial").shuffle is False and recipe("cpu").model == "fastnet"
    with pytest.raises(ConvnetError, match="unknown --recipe 'fast'.*cpu"):
        recipe("fast")
    with pytest.raises(ConvnetError, match="--faithful.*cannot be combined with --nesterov"):
        check_config(replace(recipe("cpu"), faithful=True))


def test_config_from_dict_checks_types() -> None:
    assert TrainConfig.from_dict({"epochs": 3, "lr": 1, "unknown": 0}).lr == 1.0
    with pytest.raises(RunError, match="epochs='4' should be a int"):
        TrainConfig.from_dict({"epochs": "4"})


def test_small_data_is_repeated_to_the_sized_number_of_images_per_epoch() -> None:
    from convnet.training.recipes import SIZED_IMAGES, size_to_data

    cpu = recipe("cpu")
    for images, repeats in ((100, SIZED_IMAGES // 100), (1_000, SIZED_IMAGES // 1_000), (60_000, 1),
                            (SIZED_IMAGES, 1), (1, SIZED_IMAGES)):
        sized, line = size_to_data(cpu, images)
        assert sized.repeats == repeats and sized.epochs == cpu.epochs, images
        assert replace(sized, repeats=1) == cpu  # nothing else changes
        steps = cpu.epochs * math.ceil(repeats * images / cpu.batch_size)
        assert f"{cpu.epochs} epochs of " in line and f"({steps:,} steps of {cpu.batch_size})" in line
    assert "as the recipe says" in size_to_data(cpu, 60_000)[1]
    assert "sized to the data" in size_to_data(cpu, 100)[1]


def test_a_run_with_unlabelled_images_trains_longer_and_says_so() -> None:
    from convnet.training.recipes import POOL_EPOCHS, resolve_run, size_to_data

    cpu = recipe("cpu")
    sized, line = size_to_data(cpu, 900, pool=True)
    alone, _ = size_to_data(cpu, 900)
    assert sized.epochs == round(POOL_EPOCHS * cpu.epochs) and sized.repeats == alone.repeats
    assert replace(sized, epochs=cpu.epochs) == alone  # nothing else changes
    assert f"{POOL_EPOCHS}x the recipe's epochs" in line and f"{sized.epochs} epochs of" in line
    given, _ = resolve_run(None, {"epochs": 5}, kind="cpu", hflip=True, train_images=900, pool=True)
    assert given.epochs == 5  # --epochs is taken as given


def test_sizing_leaves_given_epochs_the_tutorial_and_faithful_runs_as_they_were() -> None:
    from convnet.training.recipes import SIZED_IMAGES, resolve_run, trained_images

    def repeats(recipe_name: str | None, overrides: dict[str, object], faithful: bool = False) -> int:
        config, _ = resolve_run(recipe_name, {**overrides, "faithful": faithful}, kind="cpu", hflip=True,
                                train_images=300)
        return config.repeats

    assert repeats(None, {}) > 1 and repeats("gpu", {}) > 1
    assert repeats(None, {"epochs": 24}) == 1 and repeats("tutorial", {}) == 1 and repeats(None, {}, True) == 1
    trained = trained_images(300, 0.5)  # what a search's trials count: the images trained on, validation held out
    held_out, _ = resolve_run(None, {"val_split": 0.5}, kind="cpu", hflip=True, train_images=trained)
    assert trained == 150 and held_out.repeats == round(SIZED_IMAGES / 150)


def test_fine_tuning_freezes_an_eighth_of_the_epochs_and_never_all() -> None:
    from convnet.training.recipes import fine_tune_defaults

    assert [fine_tune_defaults(e)["freeze_epochs"] for e in (24, 12, 8, 3, 2, 1)] == [3, 2, 1, 1, 1, 0]
    assert fine_tune_defaults(24)["body_lr"] == 0.1
