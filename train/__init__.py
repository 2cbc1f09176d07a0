"""jaxtx.train (files in train/: `jaxtx.train.step` lives in `train/step.py`): the training loop, data pipeline,
objectives, checkpoints, metrics and `jaxtx train` / `jaxtx aot`. Imports jaxtx core (and kernels through it), never
jaxtx.infer."""
