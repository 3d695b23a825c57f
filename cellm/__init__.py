"""cellm: build, quantize, validate, evaluate and publish on-device language models.

The library is plain Python + numpy. It never imports Prefect (see flows/ for orchestration).
"""

__version__ = "0.1.0"
