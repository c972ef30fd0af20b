"""Every command's bad values: exit code 2, one ``error:`` line naming the option, no
traceback; runtime failures: exit 1 and one line; the parser shows every default."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

import fastconv
from fastconv import cli, dispatch
from fastconv.tools import args as A

# (argv, text the error line must contain); each must be refused before any work starts
USAGE_ERRORS = [
    (["train", "--batch-size", "0", "--epochs", "0"],
     "argument --batch-size: must be a positive integer, got 0"),
    (["train", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["train", "--synthetic-size", "0"], "argument --synthetic-size: must be a positive integer"),
    (["train", "--lr", "-1"], "argument --lr: must be a positive number, got -1"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number"),
    (["train", "--image-size", "0"], "argument --image-size: must be a positive integer"),
    (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["train", "--max-steps", "0"], "argument --max-steps: must be a positive integer"),
    (["train", "--model", "alexnet", "--image-size", "28"],
     "--image-size 28: 28x28 too small for alexnet: layer 5 (MaxPool2d with input 256x2x2)"),
    (["train", "--model", "lenet", "--image-size", "8"],
     "--image-size 8: 8x8 too small for lenet: layer 3 (Conv2d with input 6x4x4)"),
    (["train", "--model", "lenet", "--image-size", "32"],
     "layer 7 (Linear with input 576)"),
    (["train", "--model", "lenet", "--model-arg", "num_classes=3"],
     "lenet does not take 'num_classes'"),
    (["train", "--device", "tpu"], "argument --device: not a device: 'tpu'"),
    (["train", "--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (["bench", "--batch", "0", "--steps", "0"], "argument --batch: must be a positive integer"),
    (["bench", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["bench", "--batch", "-3"], "argument --batch: must be a positive integer, got -3"),
    (["bench", "--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["bench", "--inputs", "0"], "argument --inputs: must be a positive integer"),
    (["bench", "--check-batch", "0"], "argument --check-batch: must be a positive integer"),
    (["bench", "--model-arg", "variant=foo"], "alexnet does not take 'variant'"),
    (["bench", "--model", "lenet", "--model-arg", "variant=foo"],
     "--model-arg variant=foo: lenet: variant must be 'classic' or 'relu', got 'foo'"),
    (["bench", "--model", "vgg11", "--model-arg", "narrow=maybe"],
     "--model-arg narrow=maybe: expected true/false/1/0/yes/no, got 'maybe'"),
    (["bench", "--model", "alexnet", "--model-arg", "groups=two"],
     "--model-arg groups=two: expected an integer, got 'two'"),
    (["bench", "--model", "alexnet", "--model-arg", "image_size=28"],
     "--model-arg image_size 28: 28x28 too small for alexnet: layer 5"),
    (["bench", "--model-arg", "narrow"], "argument --model-arg: expects KEY=VALUE"),
    (["bench", "--backends", "cuda-magic"], "'cuda-magic' is not a fastconv backend"),
    (["bench", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["profile", "--batch", "0"], "argument --batch: must be a positive integer, got 0"),
    (["profile", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["profile", "--warmup", "-2"], "argument --warmup: must be an integer >= 0"),
    (["profile", "--top", "0"], "argument --top: must be a positive integer"),
    (["profile", "--model-arg", "variant=foo"], "alexnet does not take 'variant'"),
    (["profile", "--model", "nin", "--model-arg", "image_size=64"],
     "nin does not take 'image_size'"),
    (["profile", "--model", "vgg11", "--model-arg", "image_size=16"],
     "16x16 too small for vgg11: layer 4.4 (MaxPool2d with input 512x1x1)"),
    (["models", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "extra"], "unrecognized arguments: extra"),
    (["build-ext", "--jobs", "2"], "unrecognized arguments: --jobs 2"),
    (["trian"], "argument command: invalid choice: 'trian'"),
]


def _error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err  # one line, nothing else
    return lines[0]


@pytest.mark.parametrize("argv,message", USAGE_ERRORS, ids=[" ".join(a) for a, _ in
                                                            USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    # whatever is refused must be refused before a model is built or data is read
    monkeypatch.setattr(fastconv.models, "build", _must_not_run)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    line = _error_line(err)
    assert rc == 2, (out, err)
    assert line.startswith("fastconv") and ": error: " in line, line
    assert message in line, line
    assert "Traceback" not in out + err and out == ""


def _must_not_run(*args, **kwargs):
    raise AssertionError("a refused command went on to build its model")


@pytest.mark.parametrize("argv,value", [
    (["--model", "vgg11", "--model-arg", "narrow=no"], False),
    (["--model", "vgg11", "--model-arg", "narrow=0"], False),
    (["--model", "vgg11", "--model-arg", "narrow=YES"], True),
    (["--model", "vgg11", "--model-arg", "narrow=1"], True),
])
def test_model_arg_booleans_are_parsed_not_truthy(argv, value):
    args = cli.build_parser().parse_args(["bench", *argv])
    A.check_model_options(args)
    assert args.model_arg == {"narrow": value}


# a side each model cannot take and the layer where it runs out (None: every side >= 1 works,
# the padded GoogLeNet and ResNet-18 end in adaptive pooling)
TOO_SMALL = {"alexnet": (28, "5"), "vgg11": (16, "4.4"), "vgg16_bn": (16, "43"),
             "nin": (28, "3"), "lenet": (8, "3"), "lenet_bn": (8, "4"),
             "googlenet": None, "resnet18": None}


@pytest.mark.parametrize("name", sorted(fastconv.models.MODELS))
def test_every_model_goes_through_at_its_own_size_and_names_the_layer(name):
    assert set(TOO_SMALL) == set(fastconv.models.MODELS)
    c, h, w = fastconv.models.INPUT_SIZES[name]
    A.check_input_size(name, {}, c, h)  # raises if the helper wrongly refuses
    if TOO_SMALL[name] is None:
        A.check_input_size(name, {}, c, 1)
        return
    side, layer = TOO_SMALL[name]
    with pytest.raises(A.UsageError, match=f"too small for {name}: layer {layer} "):
        A.check_input_size(name, {}, c, side)


def test_smallest_side_reported_goes_through_and_one_less_does_not():
    with pytest.raises(A.UsageError, match="smallest side alexnet takes is (\\d+)") as info:
        A.check_input_size("alexnet", {}, 1, 28)
    smallest = int(info.value.args[0].rsplit(" ", 1)[1])
    A.check_input_size("alexnet", {}, 1, smallest)
    with pytest.raises(A.UsageError):
        A.check_input_size("alexnet", {}, 1, smallest - 1)


def test_runtime_failure_is_one_line_exit_1_and_traceback_only_with_debug(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("the device fell over\nsecond line of detail")
    monkeypatch.setattr(cli, "cmd_models", boom)
    rc = cli.main(["models"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert _error_line(err) == ("fastconv models: error: RuntimeError: the device fell over "
                                "(--debug shows the traceback)")
    for argv, env in ((["--debug", "models"], None), (["models", "--debug"], None),
                      (["models"], "debug")):
        if env:
            monkeypatch.setenv("FASTCONV_LOG", env)
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "RuntimeError: the device fell over" in err


def test_help_shows_every_default(capsys):
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or \
                    isinstance(action, argparse._HelpAction):
                continue
            help_text = sub._get_formatter()._expand_help(action)
            assert "default" in help_text.lower() or (
                action.required and help_text.endswith("(required)")), (
                name, action.option_strings, help_text)
        assert "(default: " in text
    assert "(default: 3)" in subs.choices["bench"].format_help()  # --rounds


def test_info_reports_a_bad_backend_variable_and_goes_on(capsys, monkeypatch):
    monkeypatch.setenv("FASTCONV_BACKEND", "bogus")
    # the backends' own availability is another test's business (it may build the extension)
    monkeypatch.setattr(dispatch, "availability", lambda: {n: "skipped in this test"
                                                            for n in dispatch.BACKENDS})
    rc = cli.main(["info"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in out + err
    line = [l for l in out.splitlines() if l.startswith("default")][0]
    assert "FASTCONV_BACKEND='bogus' is not a fastconv backend" in line
    assert "candidates:" in line  # the rest of the report is still there


@pytest.mark.parametrize("bad", ["alexnet", None, 3, [torch.nn.ReLU()]])
def test_convert_refuses_a_non_module_by_name(bad):
    with pytest.raises(TypeError, match=r"convert\(model\): model must be a torch.nn.Module"):
        fastconv.convert(bad)
    with pytest.raises(TypeError, match=r"revert\(model\)"):
        fastconv.revert(bad)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["train", "--model", "alexnet", "--image-size", "28"], "layer 5 (MaxPool2d"),
])
def test_real_exit_code_through_a_process(argv, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastconv.__file__)), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fastconv", *argv], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in _error_line(proc.stderr) and "Traceback" not in proc.stderr
