"""Precision, quantization and device of a loaded model.

`--precision fp32|bf16|fp16` sets the dtype of every stored float tensor; `--load-in-8bit` /
`--load-in-4bit` (bitsandbytes, CUDA only) quantize the LLM's decoder Linear layers, while SAM is
kept in float32 (LISA's `llm_int8_skip_modules=["visual_model"]`) and the embeddings, LM head,
vision tower, projector and [SEG] head stay in the compute dtype. Non-persistent buffers (rotary
frequencies, pixel means) keep their own dtype. A mode this machine cannot run is an error
saying why, before anything is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segapp.errors import InputError

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANTIZATIONS = ("8bit", "4bit")


@dataclass(frozen=True)
class Placement:
    """Where and how a model's weights live once loaded."""

    device: str = "cpu"
    precision: str = "fp32"  # key of PRECISIONS
    quantize: str | None = None  # None, "8bit" or "4bit"

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def sam_dtype(self) -> torch.dtype:
        return torch.float32 if self.quantize else self.dtype


def resolve_device(name: str) -> str:
    """The auto rule (cuda when present, else cpu); a CUDA device this machine lacks is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available", "--device")
    return name


def auto_placement(device: str, precision: str | None) -> tuple[str, str | None]:
    """Resolve "auto" device / precision for this machine."""
    device = resolve_device(device)
    if precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = None  # the weights' own dtype
    return device, precision


def resolve_placement(
    device: str = "cpu",
    precision: str | None = None,
    quantize: str | None = None,
    *,
    model_default: str = "fp32",
) -> Placement:
    """Check a requested device / precision / quantization against this machine.

    precision None: the model's default (`model_default`), fp16 when quantizing.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {quantize!r}: use 8bit or 4bit", "--load-in-*")
    flag = f"--load-in-{quantize}"
    if precision is None:
        precision = "fp16" if quantize else model_default
    if precision not in PRECISIONS:
        choices = ", ".join(PRECISIONS)
        raise InputError(f"unknown precision {precision!r}: use one of {choices}", "--precision")
    is_cuda = device.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available", "--device")
    if quantize:
        if not is_cuda:
            why = (
                "none is available here" if not torch.cuda.is_available() else f"--device {device}"
            )
            raise InputError(f"{quantize} loading needs a CUDA GPU ({why})", flag)
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError(
                f"{quantize} loading needs bitsandbytes: pip install bitsandbytes", flag
            )
        if precision == "fp32":
            raise InputError(
                f"{quantize} layers compute in fp16 or bf16: use --precision fp16 or bf16", flag
            )
    if precision == "bf16" and is_cuda and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU has no bf16 support: use --precision fp16", "--precision")
    return Placement(device=device, precision=precision, quantize=quantize)


def cast_floating_(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and persistent float buffers in place; non-persistent buffers keep their
    dtype (unlike `module.to(dtype)`, which would round rotary frequencies to bf16)."""
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in sub.named_buffers(recurse=False):
            if name in sub._non_persistent_buffers_set or not buf.is_floating_point():
                continue
            setattr(sub, name, buf.to(dtype))


def quantize_linear_layers_(module: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Swap every nn.Linear under `module` for a bitsandbytes layer holding the same weights.

    The weights are quantized when the model moves to CUDA. Returns how many layers changed.
    """
    import bitsandbytes as bnb  # checked by resolve_placement

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            has_bias = child.bias is not None
            new: nn.Module
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=has_bias,
                    has_fp16_weights=False, threshold=6.0,
                )  # fmt: skip
                new.weight = bnb.nn.Int8Params(
                    child.weight.data.to(compute_dtype), requires_grad=False, has_fp16_weights=False
                )
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=has_bias,
                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                )  # fmt: skip
                new.weight = bnb.nn.Params4bit(
                    child.weight.data.to(compute_dtype), requires_grad=False,
                    compress_statistics=True, quant_type="nf4",
                )  # fmt: skip
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, new)
            count += 1
    return count


def set_dtypes_(model: nn.Module, placement: Placement) -> None:
    """Cast a SegLLM to the placement's dtypes (SAM to float32 when quantizing). Done before
    weights are copied in, each stored value is rounded once, straight to its final dtype."""
    cast_floating_(model, placement.dtype)
    sam = getattr(model, "sam", None)
    if sam is not None:
        cast_floating_(sam, placement.sam_dtype)
        # segment_anything's positional encoding multiplies float32 coordinates by this matrix
        # (LISA's fork casts instead): it stays float32, the result is cast where it is used
        for module in sam.modules():
            matrix = getattr(module, "positional_encoding_gaussian_matrix", None)
            if isinstance(matrix, torch.Tensor) and matrix.dtype != torch.float32:
                module.positional_encoding_gaussian_matrix = matrix.float()


def place_(model: nn.Module, placement: Placement) -> None:
    """Give a loaded SegLLM its precision, quantization and device (in place)."""
    set_dtypes_(model, placement)
    if placement.quantize:
        llm: Any = getattr(model, "llm")  # noqa: B009 - any module with an `llm` (SegLLM)
        decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
        layers: nn.Module = getattr(decoder, "layers", decoder)  # embeddings and lm_head stay
        quantize_linear_layers_(layers, placement.quantize, placement.dtype)
    model.to(placement.device)
    model.eval()
