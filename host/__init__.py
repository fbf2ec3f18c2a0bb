"""jetyolo host side: the workstation that checks data, trains, exports, calibrates and packs the
bundle. Heavy imports (torch, ultralytics, onnx) happen inside functions, never at import time,
so ``jetyolo --help`` and the device runtime stay light."""
