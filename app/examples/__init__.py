"""Example models for ``WORKER_CLASS``, one file each (docs/SERVE_YOUR_MODEL.md).

``vit`` (the default image classifier, ``app.worker:ViTWorker``), ``echo_worker`` (no model:
what the server costs), ``embedder`` (image embeddings), ``detector`` (object detection),
``text`` (text classification from a JSON body), ``causal_lm`` (a Hugging Face language model
whose text streams, with continuous batching), ``progress`` (a stream without a model).
"""
