"""The Triton backend: Kernel IR -> Triton source -> GPU kernels (or the interpreter on CPU)."""

from memopt.backends.narrow import KINDS
from memopt.backends.registry import AttentionKernels, Backend, Feature, register_backend
from memopt.backends.triton.attention import MAX_HEAD_DIM
from memopt.backends.triton.attention_call import AttentionKernel
from memopt.backends.triton.ops import Unsupported
from memopt.backends.triton.quantized import matmul as quantized_matmul
from memopt.backends.triton.render import RenderedKernel
from memopt.backends.triton.runtime import TritonKernel, compile_kernel, render, source_file
from memopt.backends.triton.tiles import describe_tiles, matmul_tiles


def _describe_template(m: int, n: int, k: int, half: bool) -> str:
    return f"GPU tiles {describe_tiles(matmul_tiles(m, n, k, on_gpu=True, half=half))}"


TRITON = register_backend(
    Backend(
        name="triton",
        compile=compile_kernel,
        # GPUs; CPU tensors run under Triton's interpreter (tests, small shapes).
        device_types=None,
        default_for=frozenset({"cuda"}),
        features=frozenset({Feature.MATMUL_TEMPLATES, Feature.SECTOR_MEMORY}),
        source_file=source_file,
        attention=AttentionKernels(max_head_dim=MAX_HEAD_DIM, make_target=AttentionKernel),
        describe_template=_describe_template,
        quantized_matmul=quantized_matmul,
        quantized_formats=frozenset(KINDS),
    )
)

__all__ = ["RenderedKernel", "TritonKernel", "Unsupported", "compile_kernel", "render"]
