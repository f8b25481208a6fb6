"""Evaluation: one scorer for every kind of model, whose numbers are scikit-learn's on the
model's own predictions; known test logits are reused, a training split left unscored is
"not measured", and a wrong argument is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from convnet.core.errors import InputError
from convnet.data.dataset import Dataset, InputSpec, Split
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.models.networks import create_model
from convnet.trust.evaluation import Evaluation, evaluate, score_splits

SPEC = InputSpec(1, 10, 10, ("a", "b", "c"))


def _dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = [Split(torch.randint(0, 256, (n, 1, 10, 10), dtype=torch.uint8, generator=g),
                   torch.randint(0, 3, (n,), generator=g)) for n in (40, 30)]
    return Dataset("toy", SPEC, split[0], split[1], "")


def test_the_scores_are_scikit_learns_on_the_models_predictions() -> None:
    torch.manual_seed(0)
    model, data = create_model("seed", 3, 1, 10), _dataset()
    ev = evaluate(model, data, engine=Engine.faithful())
    predicted = infer(model, data.test.images, engine=Engine.faithful()).argmax(1).numpy()
    y = data.test.labels.numpy()
    assert ev.test.accuracy == pytest.approx(skm.accuracy_score(y, predicted))
    assert np.array_equal(ev.confusion_matrix, skm.confusion_matrix(y, predicted, labels=[0, 1, 2]))
    assert ev.report["b"]["f1-score"] == pytest.approx(skm.f1_score(y, predicted, labels=[1], average="macro"))
    assert torch.allclose(ev.test.probabilities.sum(1), torch.ones(30))
    train_predicted = infer(model, data.train.images, engine=Engine.faithful()).argmax(1).numpy()
    assert ev.train.accuracy == pytest.approx(skm.accuracy_score(data.train.labels.numpy(), train_predicted))


def test_any_model_is_scored_the_same_way() -> None:
    """A function of the images (as an ONNX Runtime session is) scores like the model it computes."""
    torch.manual_seed(0)
    model, data = create_model("seed", 3, 1, 10), _dataset()
    by_model = evaluate(model, data, engine=Engine.faithful())
    by_function = score_splits(lambda images: infer(model, images, engine=Engine.faithful()).softmax(1), data)
    assert by_function.to_json() == by_model.to_json()


def test_known_test_logits_are_reused_and_the_training_split_can_stay_unscored() -> None:
    data = _dataset()
    logits = torch.zeros(30, 3)
    logits[:, 2] = 1.0  # "c" for every test image
    ev = evaluate(create_model("seed", 3, 1, 10), data, engine=Engine.faithful(), test_logits=logits,
                  score_train=False)
    assert ev.train.accuracy is None and ev.to_json()["train"] == {"accuracy": None}
    assert ev.test.accuracy == pytest.approx(float((data.test.labels == 2).float().mean()))


def test_the_scores_survive_json() -> None:
    torch.manual_seed(0)
    ev: Evaluation = evaluate(create_model("seed", 3, 1, 10), _dataset(), engine=Engine.faithful())
    back = json.loads(json.dumps(ev.to_json()))
    assert back["test"]["accuracy"] == ev.test.accuracy and back["classes"] == ["a", "b", "c"]
    assert np.array_equal(np.array(back["test"]["confusion_matrix"]), ev.confusion_matrix)


def test_anything_but_a_dataset_is_named() -> None:
    with pytest.raises(InputError, match="a tuple was given; expected a convnet.Dataset"):
        evaluate(create_model("seed", 3, 1, 10), (np.zeros((2, 10, 10)), np.zeros(2)))  # type: ignore[arg-type]
