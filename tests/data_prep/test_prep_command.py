"""`braindino-prep` as a new user meets it: the demo, --help, a bad --out, Ctrl-C, the work folder."""

from __future__ import annotations

import argparse
import shutil

import pytest

import braindino_jax

from braindino_jax.cli import prep
from braindino_jax.data import shards
from braindino_jax.preprocessing.phantom import write_phantom
from data_prep import local_runner, options

SMALL = ["--spacing", "none", "--size", "32", "--margin", "2", "--workers", "1"]


def test_demo_shows_progress_removes_its_work_and_is_reproducible_elsewhere(tmp_path, capsys):
    """README's first command. Progress shows while the phantoms are written and while the
    shards are; after success _work is gone and the summary says so; the same inputs under
    another output folder give byte-identical shards."""
    out = tmp_path / "demo_out"
    assert prep.main(["--demo", "--out", str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "writing demo phantoms: 100%" in captured.err and "8/8" in captured.err
    assert "writing shards: 100%" in captured.err
    assert not (out / "_work").exists()
    assert f"work:     removed {out / '_work'} (" in captured.out
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    other = tmp_path / "elsewhere" / "demo_out"
    shutil.copytree(out / options.DEMO_INPUTS, other / options.DEMO_INPUTS)  # what --demo writes, elsewhere
    assert prep.main(["--demo", "--out", str(other), "--workers", "2", "--no-progress", "--keep-work"]) == 0
    assert f"work:     kept {other / '_work'}" in capsys.readouterr().out
    assert (other / "_work").is_dir()
    first, second = shards.list_shards(out, "slices"), shards.list_shards(other, "slices")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def _ctrl_c_on_third_call(real):
    """``real``, except that its third call raises KeyboardInterrupt, as Ctrl-C there would."""
    calls = []

    def wrapped(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    return wrapped


def test_an_interrupted_demo_leaves_nothing_and_stale_halves_are_cleared(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / ".demo_inputs.tmp-4242").mkdir(parents=True)  # left by a run that was killed
    (out / ".demo_inputs.tmp-4242" / "half.nii.gz").write_bytes(b"partial")
    import braindino_jax.preprocessing.phantom as phantom

    monkeypatch.setattr(phantom, "write_phantom", _ctrl_c_on_third_call(phantom.write_phantom))
    assert prep.main(["--demo", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == "braindino-prep: interrupted; no volume had finished; re-run the same command to start again\n"
    assert sorted(p.name for p in out.iterdir()) == []  # neither this run's half nor the stale one


def test_the_interrupt_message_says_what_is_kept(tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "in"
    for i in range(3):
        write_phantom(inputs / f"sub-0{i}_T1w.nii.gz", i, spacing=(4.0, 4.0, 4.0), skull_stripped=True)
    monkeypatch.setattr(local_runner, "process_cached", _ctrl_c_on_third_call(local_runner.process_cached))
    out = tmp_path / "out"
    assert prep.main(["--root", str(inputs), "--out", str(out), "--no-progress", *SMALL]) == 130
    assert capsys.readouterr().err == (f"braindino-prep: interrupted; 2 finished volumes kept in {out / '_work'}; "
                                       "re-run the same command to resume\n")


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_a_bad_out_is_an_error_line_before_any_work(tmp_path, capsys, kind):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if kind == "a file" else blocker / "shards"
    assert prep.main(["--demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"braindino-prep: error: --out {out}: ")
    assert ("exists and is not a folder" if kind == "a file" else "cannot create the folder") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no demo inputs were written


def _check_help(parser: argparse.ArgumentParser) -> None:
    """Every option has a line of help, enumerations are choices, and the help shows each
    default that is not "none"/"off" (those say in their help what happens)."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        assert action.help, action.dest
        unset = action.default is None or action.default is False or action.default == []
        if not unset and not action.required and action.option_strings:
            assert "(default: " in parser._get_formatter()._format_action(action).replace("\n", " "), action.dest


@pytest.mark.parametrize("face", ["prep", "beam", "preview", "convert"])
def test_help_and_version_of_every_command(face, capsys):
    if face == "prep":
        parser = options.build_parser("braindino-prep")
    elif face == "beam":
        from data_prep import beam_pipeline

        parser = options.build_parser(beam_pipeline.PROG, local=False, epilog=beam_pipeline.EPILOG)
        assert parser.format_usage().startswith("usage: python -m data_prep.beam_pipeline")
        assert "apache_beam.options.pipeline_options" in parser.format_help()
    elif face == "preview":
        from braindino_jax.cli.preview import build_parser

        parser = build_parser()
    else:
        from braindino_jax.cli.convert import build_parser

        parser = build_parser()
        for sub in parser._subparsers._group_actions[0].choices.values():
            _check_help(sub)
    _check_help(parser)
    assert "--version" in parser.format_help()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip().endswith(braindino_jax.__version__)
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    if face in ("prep", "beam"):
        assert set(choices) >= {"interpolation", "four_d_policy", "mask_method"}
