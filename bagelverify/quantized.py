"""Quantized checkpoints: FP8 weight codes and the tensors that give codes their meaning.

bagelverify loads, converts and repairs BF16, F16 and F32 BAGEL checkpoints. A quantized export
stores weights as codes (FP8 ``F8_E4M3``/``F8_E5M2``, or packed integers) beside scale tensors
(``weight_scale``, ``weight_scale_inv``, ``input_scale``, ...): a code is a weight only once
multiplied by its scale, so reading the codes as weights gives a silently wrong model.
:func:`find_quantization` recognises such a checkpoint from its header (names and dtypes only),
and :meth:`Quantization.error` says what it is and what to do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import QuantizedCheckpointError, counted, format_examples

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
"""Safetensors names of the FP8 dtypes."""

QUANTIZATION_NAMES = frozenset(
    {
        # FP8 / INT8 exports: compressed-tensors (llm-compressor), NVIDIA ModelOpt, vLLM, and
        # the block-scaled FP8 of DeepSeek-V3 / transformers' FP8 (``weight_scale_inv``)
        "weight_scale",
        "weight_scale_inv",
        "weight_scale_2",
        "weight_global_scale",
        "weight_zero_point",
        "weight_g_idx",
        "weight_packed",
        "weight_shape",
        "input_scale",
        "input_scale_inv",
        "input_global_scale",
        "input_zero_point",
        "output_scale",
        "q_scale",
        "k_scale",
        "v_scale",
        "kv_scale",
        # ComfyUI's scaled FP8 files
        "scale_weight",
        "scale_input",
        "scaled_fp8",
        # bitsandbytes (LLM.int8 and 4-bit: ``weight.quant_state.bitsandbytes__nf4``)
        "SCB",
        "weight_format",
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "bitsandbytes__nf4",
        "bitsandbytes__fp4",
        # GPTQ / AWQ
        "qweight",
        "qzeros",
        "scales",
        "g_idx",
    }
)
"""Last name components of the tensors quantized exports store beside their codes (no BAGEL key
family ends in one of them)."""

SUPPORTED_DTYPES = "BF16, F16 and F32"
"""The floating dtypes bagelverify reads as weights."""

BF16_RELEASE = "ByteDance-Seed/BAGEL-7B-MoT"
"""Where the unquantized (BF16) release is published."""


def is_quantization_key(key: str) -> bool:
    """Whether ``key`` names a quantization tensor (a scale, zero point, packed code, ...)."""
    return key.rsplit(".", 1)[-1] in QUANTIZATION_NAMES


def _module(key: str) -> str:
    """``a.b.weight_scale`` -> ``a.b``; a bitsandbytes ``a.b.weight.absmax`` -> ``a.b`` too."""
    module = key.rsplit(".", 1)[0] if "." in key else ""
    for tail in (".weight.quant_state", ".weight"):
        module = module.removesuffix(tail)
    return module


@dataclass(frozen=True)
class Quantization:
    """What makes a checkpoint quantized: its FP8 tensors and its quantization tensors."""

    codes: dict[str, str]
    """Key -> dtype of every tensor stored as FP8, in checkpoint order."""
    scales: dict[str, str]
    """Key -> dtype of every quantization tensor (scales, zero points, packed codes)."""

    @property
    def keys(self) -> list[str]:
        """Every key involved: the FP8 tensors, then the quantization tensors."""
        return [*self.codes, *self.scales]

    def involving(self, keys: Iterable[str]) -> Quantization | None:
        """The part of this quantization that touches ``keys``: those stored as FP8, and those
        whose module has quantization tensors (their own codes, whatever the dtype, are not
        weights either); ``None`` when none does."""
        scaled = {_module(key) for key in self.scales}
        wanted = [key for key in keys if key in self.codes or _module(key) in scaled]
        if not wanted:
            return None
        modules = {_module(key) for key in wanted}
        return Quantization(
            {key: self.codes[key] for key in wanted if key in self.codes},
            {key: dtype for key, dtype in self.scales.items() if _module(key) in modules},
        )

    def describe(self) -> str:
        """``158 tensors stored as FP8 (F8_E4M3 158; 'a', ...) and 158 quantization tensors
        (weight_scale 158; 'a_scale', ...)``."""
        parts = []
        if self.codes:
            dtypes = Counter(self.codes.values())
            parts.append(
                f"{counted(len(self.codes), 'tensor')} stored as FP8 "
                f"({_tally(dtypes)}; {format_examples(list(self.codes))})"
            )
        if self.scales:
            names = Counter(key.rsplit(".", 1)[-1] for key in self.scales)
            parts.append(
                f"{counted(len(self.scales), 'quantization tensor')} "
                f"({_tally(names)}; {format_examples(list(self.scales))})"
            )
        return " and ".join(parts)

    def error(
        self, source: str, what: str = "a quantized checkpoint", outcome: str = ""
    ) -> QuantizedCheckpointError:
        """The error naming ``source`` as ``what`` (``"a quantized checkpoint"``), the tensors,
        what bagelverify supports, ``outcome`` (``"nothing was written"``) and what to do."""
        if self.scales:
            meaning = (
                "Its values are codes that are weights only once multiplied by their scales, "
                "which bagelverify does not apply"
            )
            advice = (
                "Dequantize it first (weight = code x scale, with the tool that quantized it) "
                f"or use the BF16 release ({BF16_RELEASE})."
            )
        else:
            meaning = (
                "No scale tensors were found: these are either plain FP8 casts or codes whose "
                "scales were lost"
            )
            advice = (
                "If they are plain casts, widen them with `bagelverify convert --dtype bf16` "
                "(rewrite_checkpoint(dtype='bf16')); otherwise use the BF16 release "
                f"({BF16_RELEASE})."
            )
        return QuantizedCheckpointError(
            f"{source}: {what}: {self.describe()}. {meaning}; bagelverify reads "
            f"{SUPPORTED_DTYPES} BAGEL checkpoints{outcome and '; ' + outcome}. {advice}",
            self.keys,
        )


def _tally(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))


def find_quantization(dtypes: Mapping[str, str]) -> Quantization | None:
    """The quantization of a checkpoint given each key's safetensors dtype, or ``None`` when it
    holds no quantization tensor: FP8 tensors alone are plain FP8 values (a checkpoint cast to
    FP8, whose values every floating dtype bagelverify reads holds exactly), since nothing in
    the file tells them from codes whose scales were dropped."""
    codes = {key: dtype for key, dtype in dtypes.items() if dtype in FP8_DTYPES}
    scales = {
        key: dtype for key, dtype in dtypes.items() if key not in codes and is_quantization_key(key)
    }
    return Quantization(codes, scales) if scales else None
