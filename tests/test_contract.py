"""The served API's names have one owner, clients/contract.py. The python-backend sources in
model_repository/ are copied standalone into every repository and cannot import it: they spell the
names themselves, and these tests hold them to the contract (read with ast, nothing is run)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from clip_triton.clients import contract

SOURCES = Path(__file__).resolve().parents[1] / "model_repository"


def test_model_names_per_prefix() -> None:
    names = contract.model_names("p")
    assert list(names) == list(contract.MODEL_ROLES)
    assert names == {role: f"p_{role}" for role in contract.MODEL_ROLES}
    assert set(contract.ENSEMBLES) == set(contract.ENSEMBLE_INPUTS) <= set(names)


def _parameters_read(path: Path) -> set[str]:
    """Config parameter keys a python model reads: `params[KEY]`, `params.get(KEY)`, `_param(config, KEY)`."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        key: ast.expr | None = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "params":
            key = node.slice
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "_param" and len(node.args) > 1:
                key = node.args[1]
            elif (
                isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name)
                and func.value.id == "params" and node.args
            ):
                key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
    return keys


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "image_preprocess/model.py",
            {contract.PARAM_PREPROCESS, contract.PARAM_OUTPUT_NAME, contract.PARAM_THREADS, *contract.REQUEST_LIMITS},
        ),
        (
            "text_tokenize/model.py",
            {
                contract.PARAM_TOKENIZER,
                contract.PARAM_OUTPUT_NAME,
                contract.PARAM_OUTPUT_DTYPE,
                *contract.TEXT_LIMITS,
                *contract.REQUEST_LIMITS,
            },
        ),
        (
            "onnx_encoder/model.py",
            # intra_op_threads: the file's older name for Triton's intra_op_thread_count, still read.
            {
                contract.PARAM_VALID_RANGE,
                contract.PARAM_OPTIMIZE,
                contract.PARAM_INTRA_OP_THREAD_COUNT,
                "intra_op_threads",
            },
        ),
    ],
)
def test_python_models_read_the_contracts_parameters(source: str, expected: set[str]) -> None:
    assert _parameters_read(SOURCES / source) == expected


def test_image_limits_are_the_contracts() -> None:
    """The preprocess model reads its limits through clip_preprocess.ImageLimits, one field per parameter."""
    from clip_triton.clients.clip_preprocess import ImageLimits

    assert tuple(f.name for f in fields(ImageLimits)) == contract.IMAGE_LIMITS


def _prefixed(node: ast.expr) -> str | None:
    """f"{prefix}_image" -> "PREFIX_image"; None for anything else."""
    if not isinstance(node, ast.JoinedStr):
        return None
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
        elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name) and value.value.id == "prefix":
            parts.append("PREFIX")
        else:
            return None
    return "".join(parts) if "PREFIX" in parts else None


def test_health_probe_speaks_the_contract() -> None:
    """health_probe.py sends one request to each ensemble: its model, input name and datatype, and the
    output it reads, are the contract's."""
    tree = ast.parse((SOURCES / "health_probe.py").read_text())
    names = contract.model_names("PREFIX")
    requests, models, outputs = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_infer":
            model, name, datatype = node.args[1:4]
            assert isinstance(name, ast.Constant) and isinstance(datatype, ast.Constant)
            requests.add((_prefixed(model), name.value, datatype.value))
        if isinstance(node, ast.JoinedStr) and (model_name := _prefixed(node)) is not None:
            models.add(model_name)
        if isinstance(node, ast.Dict):  # {"name": "embedding", ...} in the request's outputs
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "outputs" and isinstance(value, ast.List):
                    outputs |= {v.value for d in value.elts if isinstance(d, ast.Dict)
                                for k, v in zip(d.keys, d.values, strict=True)
                                if isinstance(k, ast.Constant) and k.value == "name" and isinstance(v, ast.Constant)}
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "outputs"
        ):
            outputs |= {a.value for a in node.args[:1] if isinstance(a, ast.Constant)}
    expected = {
        (names[role], contract.ENSEMBLE_INPUTS[role].name, contract.ENSEMBLE_INPUTS[role].datatype)
        for role in contract.ENSEMBLES
    }
    assert requests == expected
    assert models == {names[role] for role in contract.ENSEMBLES}
    assert outputs == {contract.EMBEDDING_OUTPUT}
