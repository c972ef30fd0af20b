"""fastconv: fused Conv2d+bias+ReLU, max-pool and batch norm (+ReLU) for classic CNNs.

    import fastconv
    model = fastconv.convert(fastconv.models.alexnet())   # same state_dict keys
    y = fastconv.functional.conv2d_relu(x, w, b, padding=1, backend="triton")
    print(fastconv.explain("conv2d_relu", x, w, b, padding=1))

Backends: "torch" (plain torch ops), "triton" (GPU), "extension" (C++/CUDA). ``backend=None``
means ``$FASTCONV_BACKEND`` or "auto". Importing fastconv never needs a GPU or a compiler.
"""
from . import functional, models, nn
from .convert import ConversionReport, conversion_report, convert, revert
from .dispatch import BackendUnavailableError, availability
from .functional import backend_for, explain

__version__ = "0.1.0"

__all__ = ["functional", "nn", "models", "convert", "revert", "conversion_report",
           "ConversionReport", "explain", "backend_for", "availability",
           "BackendUnavailableError", "__version__"]
