"""rtdetr_kernels: fused Triton and CUDA C++ kernels for DETR-style detectors.

Public API:
    ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, ...)
    aifi_attention(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, ...)
    topk_select(logits, k, gather=(...), ...)
    patch(model, msda=True, attention=True, topk=True, backend=None) -> handle with revert() and report()
    use_backend(name), explain(op, *args, **kwargs), BackendUnavailableError
"""


if __name__ != "rtdetr_kernels":
    # This directory is the source of the ``rtdetr_kernels`` package (setup.py installs it under that
    # name). With the repository root on sys.path (``python -m pytest``, a REPL started there) it is
    # also importable as ``kernels``, the name of Hugging Face's kernel-hub package, which transformers
    # probes for on import. Running the package a second time under that name would define every
    # ``rtdetr_kernels::`` op again, and torch replaces a redefined custom op: the first import's op
    # handles would then point at freed dispatcher entries. So under any other name it defines nothing.
    def __getattr__(name):
        raise AttributeError(f"{__file__} is the source of the 'rtdetr_kernels' package, imported here as "
                             f"{__name__!r}; use `import rtdetr_kernels` (attribute {name!r} requested)")
else:
    from . import backends, export, onnx  # export, onnx: deployment (torch.export/AOTInductor, ONNX); no onnx import here
    from .backends import BackendUnavailableError, use_backend
    from .attention import aifi_attention
    from .ms_deform_attn import ms_deform_attn
    from .topk import topk_select
    from .integrations.patch import patch

    __version__ = "0.1.0"

    __all__ = ["ms_deform_attn", "aifi_attention", "topk_select", "patch", "use_backend", "BackendUnavailableError", "explain", "backends", "__version__"]

    def explain(op: str, *args, **kwargs) -> str:
        """Which backend would serve ``op(*args, **kwargs)`` and why the others would not."""
        return backends.op_definition(op).explain(*args, **kwargs)
