"""The heavy side of edge-shitu: fetch official PP-ShiTu models, write replicas, convert to bundles.

Needs the ``convert`` extra (paddlepaddle, paddle2onnx, onnx, onnxruntime). The runtime package
``edge_shitu`` never imports this package.
"""
