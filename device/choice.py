"""The names of the backend choices a config, a flag or a bundle may hold (tiny on purpose: the
config imports it without pulling in the engine code). ``BackendChoice`` (the resolved choice)
is to live beside these."""

PRECISIONS = ("fp32", "fp16", "int8")
INT8_SOURCES = ("cache", "qdq")
