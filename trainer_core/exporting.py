"""``trainer export``: a trained model as a file other programs load with
plain torch (TorchScript, ``torch.export``, ONNX), checked against the model
before it replaces anything; or its weights alone as safetensors
(:mod:`trainer_core.safetensors_file`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer_core.data import DataBundle
    from trainer_core.trained import Trained

#: Name of the JSON metadata stored inside an exported file.
EXPORT_METADATA = "trainer.json"


def exportable(trained: Trained) -> nn.Module:
    """The module that is exported, in eval mode: the model preceded by the dataset's
    normalisation (if it has one) and followed by the task's :meth:`~trainer_core.Task.exported`."""
    import torch
    from torch import nn

    data, task, model = trained.data, trained.task, trained.model.cpu()
    shape = (1, -1, *[1] * (len(data.input_shape) - 1))

    class Exported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.normalise = data.mean is not None or data.std is not None
            self.register_buffer("mean", torch.tensor(data.mean if data.mean is not None else [0.0]).view(shape))
            self.register_buffer("std", torch.tensor(data.std if data.std is not None else [1.0]).view(shape))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return task.exported(self.model((x - self.mean) / self.std if self.normalise else x))

    return Exported().eval()


def example_inputs(data: DataBundle, size: int) -> torch.Tensor:
    """A random batch of ``size`` inputs of the dataset's ``input_shape``, whatever it is, as
    the exported model takes them: token ids for a model of integer inputs, else floats in [0, 1]."""
    import torch

    shape = tuple(data.input_shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise UsageError(f"cannot export: the dataset's input_shape {shape!r} is not a shape of positive whole numbers, "
                         "so no example input can be built from it; its DataBundle must give one sample's shape")
    held = getattr(data.train, "inputs", None)
    if held is not None and not held.is_floating_point() and held.dtype != torch.uint8:
        return torch.randint(0, max(2, len(data.classes)), (size, *data.input_shape), dtype=held.dtype)
    return torch.rand(size, *data.input_shape)


def export_model(trained: Trained, fmt: str, output: Path, tolerance: float = 1e-4) -> float:
    """Write the model (with normalisation) as ``fmt`` to ``output``.

    The file is built in memory and loaded back first: it replaces ``output``
    (atomically) only when its outputs match the model's on a random batch.

    :return: the largest difference between the file's outputs and the model's
        on a batch other than the one used to trace it.
    """
    import io

    import torch

    from trainer_core.files import atomic_write_bytes

    if fmt == "safetensors":  # the weights themselves: nothing traced, nothing to compare
        from trainer_core.safetensors_file import export_info, write_safetensors

        output.parent.mkdir(parents=True, exist_ok=True)
        state = trained.payload.get("state") or {}
        write_safetensors(output, trained.model.state_dict(),
                          export_info(trained.config, trained.data, trained.task, trained.epoch, state.get("step")))
        return 0.0
    data = trained.data
    module = exportable(trained)
    example = example_inputs(data, 2)
    check = example_inputs(data, 3)  # another batch size: the file must not be fixed to the example's
    integers = not example.is_floating_point()
    metadata = json.dumps({
        "classes": [str(c) for c in data.classes],
        "input_shape": list(data.input_shape),
        "input": "token ids N x sequence length (int64)" if integers else
                 "float N x ..., as the trainer feeds batches before normalisation (image pixels scaled "
                 "to [0, 1]); the dataset's mean/std normalisation, if it has one, is inside the model",
        "task": trained.task.name,
        "output": trained.task.export_doc,
        "model": trained.config.model,
        "dataset": trained.config.dataset,
        "epoch": trained.epoch,
        "checkpoint": str(trained.path),
    }, indent=2)
    buffer = io.BytesIO()
    # torch.jit and the TorchScript-based ONNX exporter warn that they are deprecated upstream;
    # the files they write are still what many programs load, so the warnings are not the user's concern.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = _run_example(module, check, data)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), buffer, _extra_files={EXPORT_METADATA: metadata})
            got = torch.jit.load(io.BytesIO(buffer.getvalue()))(check)
        elif fmt == "exported-program":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, buffer, extra_files={EXPORT_METADATA: metadata})
            got = torch.export.load(io.BytesIO(buffer.getvalue())).module()(check)
        else:  # onnx, offered only when the onnx package is importable
            import onnx
            from onnx.reference import ReferenceEvaluator

            names = ("images", "logits") if trained.task.name == "classification" else ("inputs", "outputs")
            torch.onnx.export(module, (example,), buffer, input_names=[names[0]], output_names=[names[1]],
                              dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}}, dynamo=False)
            document = onnx.load_from_string(buffer.getvalue())
            entry = document.metadata_props.add()
            entry.key, entry.value = EXPORT_METADATA, metadata
            buffer = io.BytesIO(document.SerializeToString())
            # onnx's own pure-Python runtime: no onnxruntime needed for the check.
            got = torch.from_numpy(ReferenceEvaluator(document).run(None, {names[0]: check.numpy()})[0])
    difference = float((got - expected).abs().max())
    if not difference <= tolerance:
        raise UsageError(f"the {fmt} file's outputs differ from the model's by {difference:.3g}, so nothing was written; "
                         "the model may not be traceable (data-dependent control flow)")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, buffer.getvalue())
    return difference


def _run_example(module: nn.Module, example: torch.Tensor, data: DataBundle) -> torch.Tensor:
    """The model's outputs for the example batch; a model that fails on it is one line saying why."""
    try:
        return module(example)
    except Exception as exc:  # (the model itself: any error it raises on a batch of the declared shape)
        reason = " ".join(str(exc).split())[:200]
        raise UsageError(f"cannot export: the model fails on an example batch built from the dataset's input_shape "
                         f"{tuple(data.input_shape)} ({tuple(example.shape)}, {example.dtype}): {type(exc).__name__}: "
                         f"{reason}; the dataset's input_shape must be the shape of one sample as the model takes it") from None


def export_formats() -> list[str]:
    """The formats ``trainer export`` offers here."""
    import importlib.util

    formats = ["torchscript", "exported-program", "safetensors"]
    return formats + (["onnx"] if importlib.util.find_spec("onnx") is not None else [])
