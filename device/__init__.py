"""jetyolo device runtime: what runs on the Jetson.

Lean by design: numpy, OpenCV, TensorRT + pycuda (from JetPack), paho-mqtt, and ONNX Runtime as
the CPU backend. Never torch, ultralytics, onnx-graphsurgeon or anything from ``host``.
"""

__version__ = "0.1.0"
