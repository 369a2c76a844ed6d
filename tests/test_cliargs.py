"""Every flag of every `ilf` subcommand goes through the one dataclass-to-argparse helper and lands in
its dataclass field with the field's type."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

import pytest

from ilf_runtime import cliargs
from ilf_runtime.cli import COMMANDS, EvalCommand, InfoArgs, SampleArgs, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _arg_classes() -> dict[str, type]:
    from ilf_runtime.bench import BenchArgs
    from ilf_runtime.train import TrainArgs

    return {
        "sample": SampleArgs,
        "eval": EvalCommand,
        "info": InfoArgs,
        "train": TrainArgs,
        "bench": BenchArgs,
    }


def _leaves(cls: type, prefix: tuple[str, ...] = ()):
    """(path to the value, field, type) of every flag-carrying field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t, _ = cliargs.unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, prefix + (f.name,))
        elif f.metadata.get("cli", True):
            yield prefix + (f.name,), f, t


# values that pass each dataclass's own validation where the generic choice would not
SPECIAL = {
    "loop_start": "5", "loop_end": "7", "loop_steps": "last:3", "scale_shape": "channel",
    "feedback_init": "copy:2", "steps": "5", "teacher_steps": "40", "target": "trajectory+fast",
    "loss_space": "x", "states": "teacher", "methods": "plain,ilf", "solvers": "ddim", "sweep": "fora=2",
    "plain_steps": "10,12", "classes": "1,2", "dtype": "bf16", "device": "cpu", "solver": "dpmpp_2m",
    "model": "tiny-random", "ema": "0.5", "per_class": "3", "batch_size": "7", "file": "f.safetensors",
    "grid": "0,2,4,6,8,10,12,14,17,19", "plain_grid": "0,3,6,9,13,16,19",
}  # fmt: skip


def _value(f: dataclasses.Field, t: type) -> tuple[list[str], typing.Any]:
    """(command-line tokens after the flag, expected field value)."""
    if f.name in SPECIAL:
        raw = SPECIAL[f.name]
    elif "choices" in f.metadata:
        raw = str(f.metadata["choices"][-1])
    elif t is float or typing.get_args(t) == (float,):
        raw = "0.25"
    else:
        raw = "3" if t is int else "x"
    conv = f.metadata.get("type") or (t if t in (int, float, str) else typing.get_args(t)[0])
    value = conv(raw)
    return [raw], ([value] if typing.get_origin(t) is list and "type" not in f.metadata else value)


REQUIRED = {"sample": ["--model", "tiny-random"], "info": ["f.safetensors"]}


@pytest.mark.parametrize("command", ["sample", "eval", "info", "train", "bench"])
def test_every_flag_reaches_its_field(command):
    parser = build_parser()
    cls = _arg_classes()[command]
    checked = 0
    for path, f, t in _leaves(cls):
        if t is bool:
            default = cliargs.field_default(f)
            flag = ("--no-" if default is True else "--") + f.name.replace("_", "-")
            tokens, expected = [flag], not default
        else:
            tokens, expected = _value(f, t)
            tokens = tokens if f.metadata.get("positional") else [cliargs.flag_name(f.name), *tokens]
        argv = [
            command,
            *[t for t in REQUIRED.get(command, []) if not (f.metadata.get("positional"))],
            *tokens,
        ]
        if f.name == "model" and command == "sample":
            argv = [command, *tokens]
        ns = parser.parse_args(argv)
        if command == "train":
            from ilf_runtime.train import args_from_namespace

            obj = args_from_namespace(ns)
        else:
            obj = cliargs.from_namespace(cls, ns)
        got = obj
        for name in path:
            got = getattr(got, name)
        assert got == expected and type(got) is type(expected), (command, f.name, got, expected)
        checked += 1
    assert checked == len(list(_leaves(cls)))
    assert set(_subparsers()) == set(COMMANDS)


def test_train_guidance_is_a_float():
    from ilf_runtime.train import args_from_namespace

    a = args_from_namespace(
        build_parser().parse_args(["train", "--guidance", "4", "--preset", "fashion-dit"])
    )
    assert a.guidance == 4.0 and isinstance(a.guidance, float)
    assert a.loop.loop_start == 5  # from the preset


def test_helper_types_defaults_and_help():
    @dataclass
    class Args:
        """Example.

        Args:
            count: how many.
            scale, shift: two numbers
                documented together.
            names: repeatable names.
            fast: go fast.
            slow: go slow.
        """

        count: int = 2
        scale: float | None = None
        shift: float = 0.5
        names: list[str] = field(default_factory=list)
        fast: bool = False
        slow: bool = True

    p = argparse.ArgumentParser()
    cliargs.add_dataclass_arguments(p, Args)
    a = cliargs.from_namespace(Args, p.parse_args([]))
    assert a == Args()
    a = cliargs.from_namespace(
        Args,
        p.parse_args(["--count", "5", "--scale", "4", "--names", "a", "--names", "b", "--fast", "--no-slow"]),
    )
    assert (a.count, a.scale, a.names, a.fast, a.slow) == (5, 4.0, ["a", "b"], True, False)
    assert isinstance(a.scale, float)
    helps = cliargs.field_help(Args)
    assert helps["shift"] == "two numbers documented together." == helps["scale"]
    with pytest.raises(SystemExit):
        p.parse_args(["--count", "x"])
