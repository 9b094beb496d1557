"""A CPU stand-in for the ``tensorrt`` API subset gator-hw uses, for tests on machines without
an NVIDIA GPU. An "engine" is the ONNX model itself, run by ONNX Runtime on the tensors whose
addresses the context was given, so a wrong export, a wrong binding or a wrong output shape
gives a wrong result here as it would on a GPU. ``BUILDS`` records every build's flags."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import onnxruntime as ort

__version__ = "10.0.0-fake"
BUILDS: list[dict] = []


class Logger:
    ERROR = 1

    def __init__(self, severity: int) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5


class BuilderFlag:
    TF32 = 7


class MemoryPoolType:
    WORKSPACE = 0


class TensorIOMode:
    INPUT = "input"
    OUTPUT = "output"


DataType = types.SimpleNamespace(FLOAT="float", HALF="half", BF16="bf16", INT32="int32")
_NUMPY = {"float": np.float32, "half": np.float16}
_ONNX_TYPES = {"tensor(float)": "float", "tensor(float16)": "half", "tensor(bfloat16)": "bf16"}


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes | None = None


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger) -> None:
        self.network, self.num_errors = network, 0

    def parse(self, data: bytes) -> bool:
        self.network.onnx = bytes(data)
        return True

    def get_error(self, i: int) -> str:
        return "no error"


class _Config:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TensorRT allows TF32 unless told otherwise
        self.pool: dict = {}
        self.timing_cache = None

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self.pool[pool] = size

    def set_flag(self, flag: int) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: int) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> object:
        return object()

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        BUILDS.append({"strongly_typed": bool(network.flags >> NetworkDefinitionCreationFlag
                                               .STRONGLY_TYPED & 1),
                       "tf32": BuilderFlag.TF32 in config.flags,
                       "timing_cache": config.timing_cache})
        return b"fake-plan:" + network.onnx


class _Engine:
    def __init__(self, onnx: bytes) -> None:
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.io = [(t, TensorIOMode.INPUT) for t in self.session.get_inputs()] + [
            (t, TensorIOMode.OUTPUT) for t in self.session.get_outputs()]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0].name

    def get_tensor_mode(self, name: str) -> str:
        return next(m for t, m in self.io if t.name == name)

    def get_tensor_dtype(self, name: str) -> str:
        return _ONNX_TYPES[next(t.type for t, _ in self.io if t.name == name)]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(next(t.shape for t, _ in self.io if t.name == name))

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine, self.address = engine, {}
        self.calls = 0

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.engine.get_tensor_shape(name)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.address[name] = ptr
        return True

    def _view(self, name: str) -> np.ndarray:
        dtype = _NUMPY[self.engine.get_tensor_dtype(name)]
        shape = self.engine.get_tensor_shape(name)
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = (ctypes.c_char * n).from_address(self.address[name])
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        self.calls += 1
        inputs = {t.name: self._view(t.name) for t, m in self.engine.io if m == "input"}
        outs = self.engine.session.run(None, inputs)
        for (t, _), value in zip((io for io in self.engine.io if io[1] == "output"), outs,
                                 strict=True):
            self._view(t.name)[...] = value
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine:
        assert plan.startswith(b"fake-plan:")
        return _Engine(plan[len(b"fake-plan:"):])
