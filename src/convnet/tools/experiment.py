"""What ``convnet train`` does, as one Python call (:func:`run_training`): a run trained
through the one path (:func:`convnet.training.run.train_run`, which checks everything before
anything is written), in this process or as one of several under torchrun, then scored on
both splits, and its trackers given the scores and pictures.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

from convnet.models.engine import single_process
from convnet.training.config import TrainRequest
from convnet.training.distributed import finish, init_distributed
from convnet.training.loop import TrainResult
from convnet.training.run import tracked, train_run
from convnet.trust.evaluation import Evaluation
from convnet.trust.report import write_plots
from convnet.trust.scoring import evaluate_run


@dataclass
class TrainOutcome:
    result: TrainResult
    evaluation: Evaluation | None  # None in the processes other than rank 0


def run_training(request: TrainRequest, *, env: dict[str, str] | None = None,
                 stream: TextIO | None = None) -> TrainOutcome:
    """Train as ``request`` says into a run folder (``request.out``, else
    ``runs/MODEL-OPTIMIZER-TIME``), in this process or as one of several under torchrun
    (``env`` holds torchrun's variables), and score the result on both splits.

    Raises:
        ConvnetError: a bad setting or input, named, before anything is written.
    """
    info = init_distributed(request.device, env if env is not None else dict(os.environ))
    try:
        trained = train_run(request, write=True, stream=stream or sys.stdout, distributed=info)
        if info is not None and info.rank != 0:
            return TrainOutcome(trained.result, None)
        result, tracker = trained.result, trained.tracker
        assert result.run_dir is not None

        def scored() -> Evaluation:  # the test split read for the one time: the final score
            engine = single_process(trained.engine)
            evaluation = evaluate_run(result.run_dir, engine=engine, dataset=trained.dataset)
            if tracker is not None:  # the scores, the pictures a user looks at first, and the run folder
                pictures = write_plots(result.run_dir, evaluation, trained.dataset.test.images, result.model)
                tracker.finish(evaluation.to_json(), {k: pictures[k] for k in ("confusion_matrix", "mistakes")},
                               result.run_dir)
            return evaluation

        return TrainOutcome(result, tracked(tracker, scored))
    finally:
        finish(info)
