"""examples/tutorial.ipynb runs end to end (on a subset of Fashion-MNIST, in a Jupyter
kernel), so it cannot rot: every cell, the notebook progress bar, the scores, the report."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "examples" / "tutorial.ipynb"


def test_tutorial_notebook_runs(real_fashion: Path, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (f'SUBSET = 2400\nSGD_EPOCHS = 1\nADAM_EPOCHS = 2\nDEVICE = "cpu"\n'
                        f'OUT = {str(tmp_path / "runs")!r}\n')
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=dict(os.environ))  # raises on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert len(re.findall(r"Categorical Cross Entropy : \d\.\d{3}", text)) == 3, text  # 1 SGD + 2 Adam epochs
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "training shows no notebook progress bar"
    accuracies = [float(a) for a in re.findall(r"Test  Accuracy : (\d\.\d{3})", text)]
    assert len(accuracies) == 2 and accuracies[1] > 0.5, accuracies  # SGD, Adam; chance is 0.1
    assert accuracies[1] > accuracies[0], accuracies  # the tutorial's point: Adam learns faster
    assert "same predictions in every layout: True" in text
    assert (tmp_path / "runs" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "runs" / "adam" / "model.safetensors").is_file()
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the sample images, the loss curves, the confusion matrix
