"""GGUF block arithmetic: reference.py models llama.cpp's CPU kernels in NumPy; llamacpp.py calls
llama.cpp's own quantisers and dot products (optional, for tests)."""
