"""The client package repeats the wire contract on purpose (it must not import torch or the
backend): these checks keep the two sides identical."""
import dataclasses
import re
from pathlib import Path

from backend.engine import SamplingParams as EngineParams
from backend.serving import INPUTS
from deepseek_v4_client import SamplingParams as ClientParams
from deepseek_v4_client import protocol

CONFIG = Path(__file__).resolve().parent.parent / "model_repository" / "deepseek_v4" / "config.pbtxt"
TRITON_TO_WIRE = {"TYPE_STRING": "BYTES", "TYPE_INT32": "INT32", "TYPE_BOOL": "BOOL", "TYPE_UINT32": "UINT32"}


def _fields(cls):
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(cls)}


def test_sampling_parameters_match():
    assert _fields(ClientParams) == _fields(EngineParams)


def test_tensor_names_and_types_match_config():
    text = CONFIG.read_text()
    section = lambda name: text[text.index(f"{name} ["):text.index("]\n", text.index(f"{name} ["))]
    pairs = lambda block: dict(re.findall(r'name: "(\w+)", data_type: (TYPE_\w+)', block))
    inputs, outputs = pairs(section("input")), pairs(section("output"))
    assert {k: TRITON_TO_WIRE[v] for k, v in inputs.items()} == protocol.INPUTS
    assert {k: TRITON_TO_WIRE[v] for k, v in outputs.items()} == protocol.OUTPUTS
    assert set(INPUTS) == set(protocol.INPUTS)
