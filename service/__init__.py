"""HTTP serving for the image classifier.

- ``service.preprocessing``: bytes -> model input (numpy + Pillow only; the training pipeline imports it)
- ``service.engine``: ONNX Runtime session, provider selection, softmax/top-k (no bentoml)
- ``service.config``: environment-variable configuration (no bentoml)
- ``service.limits``: ASGI request-size limit middleware (no bentoml)
- ``service.service``: the BentoML 1.4 services (``bentoml serve service.service:Classifier``)

Importing this package imports nothing heavy, so ``import service.preprocessing`` stays cheap.
"""
