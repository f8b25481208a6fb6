"""Training: the config and its one check, recipes and the one resolution of a run's config, the one
loop and what hangs on it (validation, checkpoints, printing, tracking), and the one path that trains
(:func:`convnet.training.run.train_run`).
"""
