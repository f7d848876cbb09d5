"""HTTP serving for the image classifier.

- ``service.contract``: the model contract: file and tensor names, metadata, ``PreprocessSpec``, the
  numerics (normalize, softmax, ONNX Runtime CPU sessions); numpy only, the pipeline uses it too
- ``service.preprocessing``: bytes -> model input (numpy + Pillow only; the training pipeline imports it)
- ``service.engine``: the serving ONNX Runtime session and provider selection (no bentoml)
- ``service.postprocessing``: logits -> softmax and top-k answers
- ``service.config``: environment-variable configuration (no bentoml)
- ``service.limits``, ``service.penalty``: pure-ASGI middleware (size and body-time limits, cancelling, error shape, the penalty box)
- ``service.patches``: every workaround for a BentoML defect, version-checked
- ``service.service``: the BentoML 1.4 services (``bentoml serve service.service:Classifier``)

Importing this package imports nothing heavy, so ``import service.preprocessing`` stays cheap.
"""
