"""jaxtx: train and serve transformers in JAX. Import paths are not file paths: this folder (jaxtx/) is the core
(`jaxtx.model` lives in `jaxtx/model.py`), while the top-level folders kernels/, train/ and infer/ install as
`jaxtx.kernels`, `jaxtx.train` and `jaxtx.infer` (`jaxtx.train.step` lives in `train/step.py`). Imports flow one way:
kernels <- core <- train, infer."""
