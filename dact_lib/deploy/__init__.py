"""Taking a trained model out of DACT Lab: export (a ``transformers`` folder, per-layer ONNX graphs with an int8
option), the torch-free ONNX Runtime early-exit runtime, predictions on files, a REST service and the latency budget.

Nothing here is imported by the package itself: ``deploy.runtime`` and ``deploy.policy`` import neither torch nor
transformers, so an exported ONNX folder runs with onnxruntime + numpy + tokenizers only.
"""
