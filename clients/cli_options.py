"""Command-line options written once: as fields of an options dataclass.

A field declared with `option(default, help=..., flags=...)` carries its `--help` text in its metadata
(nothing here imports typer, so the stages' dataclasses stay typer-free). A command decorated with
`@dataclass_options` takes such a dataclass as one parameter; Typer sees one `--option` per field (the
field's name, default, type and help) and the command receives the dataclass built from them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flags: tuple[str, ...] = (),
    envvar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option: `--field-name` unless `flags` names it
    (e.g. ("--force",) for a bare on-flag, ("--quiet", "-q") for a short one)."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"help": help, "flags": flags, "envvar": envvar}
    )


def same_option(cls: type, name: str) -> Any:
    """A field declaring the option that `cls`'s field `name` declares (default, help, flags), for another
    options dataclass that takes the same option."""
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return dataclasses.field(default=field.default, default_factory=field.default_factory, metadata=field.metadata)


def _is_options(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _parameters(cls: type) -> list[inspect.Parameter]:
    """One Typer option per field of `cls` (a default_factory field defaults to None on the command line)."""
    import typer

    types = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} is not declared with option(): it has no --help text")
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = None
        else:
            default = inspect.Parameter.empty  # a required option
        typer_option = typer.Option(*meta["flags"], help=meta["help"], envvar=meta["envvar"])
        # The field's type is known only at run time: mypy cannot read this Annotated as a type.
        annotation = Annotated[types[field.name], typer_option]  # type: ignore[name-defined, valid-type]
        params.append(inspect.Parameter(field.name, KEYWORD, default=default, annotation=annotation))
    return params


def dataclass_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Typer sees each parameter of `command` annotated with an options dataclass as that dataclass's fields,
    one option each, in place; `command` is called with the dataclass built from them."""
    hints = typing.get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for param in inspect.signature(command).parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if _is_options(annotation):
            groups[param.name] = annotation
            params += _parameters(annotation)
        else:
            params.append(param.replace(annotation=annotation, kind=KEYWORD))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: two options named {sorted({n for n in names if names.count(n) > 1})}")

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        for name, cls in groups.items():
            values = {}
            for field in dataclasses.fields(cls):
                value = kwargs.pop(field.name)
                if value is not None or field.default_factory is dataclasses.MISSING:  # None: the factory's value
                    values[field.name] = value
            kwargs[name] = cls(**values)
        return command(**kwargs)

    # Typer reads the parameters from inspect.signature (this __signature__), their types from the annotations.
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
