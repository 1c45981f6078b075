"""Triton Python-backend models, copied verbatim as ``model.py`` into generated repositories.

They run inside ``tritonserver``'s Python stub, not inside m4r: they import only numpy,
onnxruntime and ``triton_python_backend_utils`` (which the stub provides).
"""
