"""Inference: infer against a plain forward pass."""

from __future__ import annotations

import torch

from convnet.models.engine import Engine
from convnet.models.inference import infer, predict
from convnet.models.networks import create_model


def test_infer_matches_a_plain_forward_pass() -> None:
    model = create_model("seed").eval()
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images.float() / 255.0)
    torch.testing.assert_close(infer(model, images, engine=Engine.faithful(), batch_size=128), expected)
    fast = infer(model, images, engine=Engine.fast())  # may compute in bf16: close, not equal
    torch.testing.assert_close(fast, expected, rtol=0, atol=0.02)
    pred = predict(model, images, engine=Engine.faithful())
    assert pred.labels.shape == (300,) and torch.equal(pred.labels, expected.argmax(1))
    torch.testing.assert_close(pred.probabilities.sum(1), torch.ones(300))
